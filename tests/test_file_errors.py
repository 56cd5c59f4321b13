"""A damaged or malformed file is named in the error, with what is wrong with it."""

import json
import pathlib

import pytest

from lora_jax.methods import lora
from lora_jax.errors import FileFormatError
from lora_jax.evaluate import load_run
from lora_jax.interop.hub import load_pretrained
from lora_jax.methods.lora_peft import export_peft, load_peft
from lora_jax.train import train
from conftest import tiny_config
from test_reliability import save_tiny_bert


def truncate(path: pathlib.Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


@pytest.fixture
def checkpoint(tmp_path) -> pathlib.Path:
    return save_tiny_bert(tmp_path / "base", seed=0)


@pytest.fixture
def adapter(tmp_path, checkpoint) -> pathlib.Path:
    import jax

    _, params, _ = load_pretrained(checkpoint, task="classification", num_labels=2)
    spec = lora.LoraSpec(targets=(r"/query/kernel",), rank=2)
    _, trainable = lora.split(spec, params, jax.random.key(0))
    return export_peft(tmp_path / "adapter", spec, trainable, model_type="bert",
                       task="classification")


def load_adapter(directory, checkpoint):
    _, params, _ = load_pretrained(checkpoint, task="classification", num_labels=2)
    return load_peft(directory, params, model_type="bert", task="classification")


@pytest.mark.parametrize("keep", [0.5, 0.0001])
def test_truncated_model_safetensors_names_the_file(checkpoint, keep):
    truncate(checkpoint / "model.safetensors", keep)
    with pytest.raises(FileFormatError, match=rf"{checkpoint}/model.safetensors is not a "
                                              "readable safetensors file"):
        load_pretrained(checkpoint, task="classification", num_labels=2)


def test_truncated_adapter_safetensors_names_the_file(adapter, checkpoint):
    truncate(adapter / "adapter_model.safetensors")
    with pytest.raises(FileFormatError, match=rf"{adapter}/adapter_model.safetensors is not a "
                                              "readable safetensors file"):
        load_adapter(adapter, checkpoint)


@pytest.mark.parametrize("text, problem", [
    ("", "is empty"),
    ('{"r": 8, ', "is not valid JSON .* at line 1 column 10"),
    ("[1, 2]", "holds a JSON list"),
])
def test_malformed_adapter_config_names_the_file(adapter, checkpoint, text, problem):
    (adapter / "adapter_config.json").write_text(text)
    with pytest.raises(FileFormatError, match=rf"{adapter}/adapter_config.json {problem}"):
        load_adapter(adapter, checkpoint)


@pytest.mark.parametrize("missing", [("r",), ("lora_alpha",), ("r", "lora_alpha")])
def test_adapter_config_without_r_or_alpha_names_file_and_key(adapter, checkpoint, missing):
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    for key in missing:
        del config[key]
    path.write_text(json.dumps(config))
    with pytest.raises(FileFormatError, match=rf"{path} lacks 'r'|{path} lacks 'lora_alpha'") as e:
        load_adapter(adapter, checkpoint)
    assert all(repr(key) in str(e.value) for key in missing)


def test_non_finite_adapter_tensors_are_refused(adapter, checkpoint):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    path = adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = sorted(tensors)[0]
    tensors[key] = np.full_like(tensors[key], np.nan)
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(FileFormatError, match=rf"non-finite values .* in {key}"):
        load_adapter(adapter, checkpoint)


@pytest.mark.parametrize("text, problem", [("", "is empty"), ("{", "is not valid JSON")])
def test_malformed_checkpoint_config_names_the_file(checkpoint, text, problem):
    (checkpoint / "config.json").write_text(text)
    with pytest.raises(FileFormatError, match=rf"{checkpoint}/config.json {problem}"):
        load_pretrained(checkpoint, task="classification", num_labels=2)


@pytest.mark.parametrize("text, problem", [("", "is empty"), ('{"seed": 0,', "is not valid JSON")])
def test_malformed_run_config_names_the_file_for_train_and_evaluate(tmp_path, text, problem):
    workdir = tmp_path / "run"
    train(tiny_config(**{"train.max_steps": 2}), workdir)
    (workdir / "config.json").write_text(text)
    with pytest.raises(FileFormatError, match=rf"{workdir}/config.json {problem}"):
        train(tiny_config(**{"train.max_steps": 2}), workdir)
    with pytest.raises(FileFormatError, match=rf"{workdir}/config.json {problem}"):
        load_run(workdir)
