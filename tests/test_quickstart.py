"""The README's main job reaches the issue's bar (slow: about 4 minutes on 2 CPU cores)."""

import pathlib

import pytest

from lora_jax.config import load_config
from lora_jax.train import train

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_reaches_85_percent_on_sst2_dev(tmp_path):
    result = train(load_config(str(REPO / "configs/quickstart.py")), tmp_path)
    print(f"SST-2 dev accuracy {result['accuracy']:.4f}")
    assert result["accuracy"] >= 0.85
