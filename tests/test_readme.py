"""The README's Python examples run as printed, so the documented API cannot drift from the code.

Each ```python block of README.md runs in a fresh namespace, with the checkpoint path it names
("path/to/gpt2-medium") pointing at a tiny random GPT-2 saved with transformers.
"""

import pathlib
import re

import jax
import numpy as np
import pytest

from conftest import save_tiny_hf_gpt2

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
PLACEHOLDER = "path/to/gpt2-medium"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2")
    save_tiny_hf_gpt2(directory)
    return directory


def run_block(source: str, gpt2_dir) -> dict:
    namespace: dict = {}
    exec(compile(source.replace(PLACEHOLDER, str(gpt2_dir)), str(README), "exec"), namespace)
    return namespace


def test_the_readme_has_the_examples_this_test_runs():
    blocks = python_blocks()
    assert len(blocks) >= 2
    assert all(PLACEHOLDER in b for b in blocks if "load_pretrained(" in b)


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_a_readme_example_runs_as_printed(index, gpt2_dir):
    ns = run_block(python_blocks()[index], gpt2_dir)
    if "merged" in ns and "frozen_again" in ns:  # the API example: what it claims holds
        adapted = ns["apply"](ns["frozen"], ns["trainable"], ns["batch"]["input_ids"]).logits
        np.testing.assert_allclose(ns["logits"], adapted, atol=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(ns["frozen_again"]),
                        jax.tree_util.tree_leaves(ns["frozen"])):
            np.testing.assert_allclose(a, b, atol=1e-6)
        assert np.isfinite(float(ns["loss"]))
    if "stack" in ns:  # the methods example: a method's trees and its adapted forward
        assert set(ns["trainable"]) == {"params", *ns["cfg"].use}
