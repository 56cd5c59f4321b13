"""PEFT adapter export and import, checked against PEFT itself on torch.

Every parity test perturbs A, B and any trained head so that a dropped, transposed or mis-scaled
tensor changes the logits; tolerances are fixed (1e-4 on whole-model logits).
"""

import json
import pathlib
import pickle
import shutil
import typing

import jax
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers
from flax import traverse_util

from lora_jax import exports
from lora_jax.errors import FileFormatError
from lora_jax.methods import lora
from lora_jax.interop.hub import hf_module_name, load_pretrained
from lora_jax.methods.lora_peft import export_peft, load_peft
from lora_jax.models import family as model_family

ATOL = 1e-4
GPT2_SPECS = {
    "plain": lora.LoraSpec(targets=(r"attn/c_attn",), rank=4, alpha=8.0),
    # The paper's setup: q and v of the fused c_attn, plus c_fc with a rank override and a
    # fully-trained final LayerNorm (saved as a PEFT module to save).
    "split_qv": lora.LoraSpec(
        targets=(r"attn/c_attn", r"mlp/c_fc"), rank=4, alpha=8.0,
        split_outputs={r"attn/c_attn": (True, False, True)}, rank_pattern={r"h_1/mlp/c_fc": 2},
        also_train=(r"^ln_f/",)),
    "split_qv_rslora": lora.LoraSpec(
        targets=(r"attn/c_attn",), rank=2, alpha=3.0, rslora=True,
        split_outputs={r"attn/c_attn": (True, False, True)}),
}
ROBERTA_SPEC = lora.LoraSpec(targets=(r"/query/kernel", r"/value/kernel"), rank=4, alpha=8.0,
                             also_train=(r"^classifier/",))


@pytest.fixture
def gpt2_dir(tmp_path, perturb_weights):
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    perturb_weights(transformers.GPT2LMHeadModel(config)).save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2"


@pytest.fixture
def roberta_dir(tmp_path, perturb_weights):
    config = transformers.RobertaConfig(
        vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=20, num_labels=3, pad_token_id=1)
    torch.manual_seed(0)
    model = perturb_weights(transformers.RobertaForSequenceClassification(config))
    model.save_pretrained(tmp_path / "roberta")
    return tmp_path / "roberta"


def _perturbed(tree, seed: int):
    """Adds noise to every leaf: B becomes non-zero, the head moves away from the base's."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return treedef.unflatten(noisy)


def _peft_model(hf_class, base_dir, adapter_dir):
    return peft.PeftModel.from_pretrained(hf_class.from_pretrained(base_dir), adapter_dir).eval()


def _torch_logits(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    return out.logits.numpy()


def _assert_peft_holds_exactly(peft_model, adapter_dir):
    """PEFT's own state dict for the loaded adapter is the file: no missing or unexpected keys,
    every tensor loaded into the module it names."""
    expected = peft.utils.load_peft_weights(str(adapter_dir), device="cpu")
    got = peft.get_peft_model_state_dict(peft_model)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key].numpy(), value.numpy(), err_msg=key)


def _lora_modules(peft_model) -> set[str]:
    return {name.removeprefix("base_model.model.") for name, m in peft_model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


@pytest.mark.parametrize("name", list(GPT2_SPECS))
def test_export_gpt2_matches_peft(name, gpt2_dir, tmp_path, padded_batch):
    spec = GPT2_SPECS[name]
    model, params, _ = load_pretrained(gpt2_dir)
    frozen, trainable = lora.split(spec, params, jax.random.key(0))
    trainable = _perturbed(trainable, 1)
    ids, mask = padded_batch(97)
    apply = lora.adapt(model.apply, spec)
    ours = np.asarray(apply(frozen, trainable, ids, attention_mask=mask).logits)
    base = np.asarray(model.apply({"params": params}, ids, attention_mask=mask).logits)
    assert np.abs(ours - base)[mask == 1].max() > 100 * ATOL  # the adapters matter

    out = export_peft(tmp_path / "adapter", spec, trainable, model_type="gpt2", task=None)
    peft_model = _peft_model(transformers.GPT2LMHeadModel, gpt2_dir, out)
    _assert_peft_holds_exactly(peft_model, out)
    expected = {"transformer." + hf_module_name(p.removesuffix("/kernel"))
                for p in lora.target_kernels(spec, params)}
    assert _lora_modules(peft_model) == expected
    theirs = _torch_logits(peft_model, ids, mask)
    np.testing.assert_allclose(ours[mask == 1], theirs[mask == 1], rtol=0, atol=ATOL)


def test_export_split_qv_is_one_fused_rank_2r_adapter(gpt2_dir, tmp_path):
    spec = GPT2_SPECS["split_qv"]
    _, params, _ = load_pretrained(gpt2_dir)
    _, trainable = lora.split(spec, params, jax.random.key(0))
    out = export_peft(tmp_path / "adapter", spec, _perturbed(trainable, 1), model_type="gpt2",
                      task=None, base_model_name_or_path="tiny-gpt2")
    config = json.loads((out / "adapter_config.json").read_text())
    fused = [f"transformer.h.{i}.attn.c_attn" for i in range(2)]
    c_fc = [f"transformer.h.{i}.mlp.c_fc" for i in range(2)]
    assert config["target_modules"] == sorted(fused + c_fc)
    # q and v at rank 4 each: one rank-8 adapter with alpha 16, so alpha / r is still 8 / 4.
    assert (config["r"], config["lora_alpha"]) == (8, 16)
    assert config["rank_pattern"] == {c_fc[0]: 4, c_fc[1]: 2}
    assert config["alpha_pattern"] == {c_fc[0]: 8, c_fc[1]: 8}
    assert config["modules_to_save"] == ["transformer.ln_f"]
    assert (config["peft_type"], config["task_type"], config["fan_in_fan_out"]) == (
        "LORA", "CAUSAL_LM", True)
    assert config["base_model_name_or_path"] == "tiny-gpt2"
    tensors = safetensors.numpy.load_file(out / "adapter_model.safetensors")
    b = tensors[f"base_model.model.{fused[0]}.lora_B.weight"]
    assert b.shape == (96, 8) and b.dtype == np.float32
    np.testing.assert_array_equal(b[32:64], 0)  # k is not adapted
    np.testing.assert_array_equal(b[:32, 4:], 0)  # q's rows use q's A only
    np.testing.assert_array_equal(b[64:, :4], 0)
    assert tensors[f"base_model.model.{fused[0]}.lora_A.weight"].shape == (8, 32)
    assert "base_model.model.transformer.ln_f.weight" in tensors


def test_export_roberta_classifier_matches_peft(roberta_dir, tmp_path, padded_batch):
    model, params, _ = load_pretrained(roberta_dir, task="classification", num_labels=3)
    frozen, trainable = lora.split(ROBERTA_SPEC, params, jax.random.key(0))
    trainable = _perturbed(trainable, 1)
    ids, mask = padded_batch(101, pad_id=1)
    apply = lora.adapt(model.apply, ROBERTA_SPEC)
    ours = np.asarray(apply(frozen, trainable, ids, attention_mask=mask).logits)

    out = export_peft(tmp_path / "adapter", ROBERTA_SPEC, trainable, model_type="roberta",
                      task="classification")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["task_type"], config["modules_to_save"]) == ("SEQ_CLS", ["classifier"])
    peft_model = _peft_model(transformers.RobertaForSequenceClassification, roberta_dir, out)
    _assert_peft_holds_exactly(peft_model, out)
    assert _lora_modules(peft_model) == {f"roberta.encoder.layer.{i}.attention.self.{m}"
                                         for i in range(2) for m in ("query", "value")}
    np.testing.assert_allclose(ours, _torch_logits(peft_model, ids, mask), rtol=0, atol=ATOL)


def _perturb_torch_adapters(peft_model, seed: int):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


def test_load_peft_gpt2_matches_peft(gpt2_dir, tmp_path, padded_batch):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                             fan_in_fan_out=True, rank_pattern={"mlp.c_proj": 2},
                             alpha_pattern={"h.0.attn.c_attn": 5}, task_type="CAUSAL_LM")
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir), config)
    _perturb_torch_adapters(peft_model, 2)
    peft_model.save_pretrained(tmp_path / "adapter")
    ids, mask = padded_batch(97)
    theirs = _torch_logits(peft_model.eval(), ids, mask)

    model, params, _ = load_pretrained(gpt2_dir)
    spec, trainable = load_peft(tmp_path / "adapter", params, model_type="gpt2")
    assert spec.scale("h_0/attn/c_attn/kernel", 4) == 5 / 4
    assert spec.rank_for("h_1/mlp/c_proj/kernel") == 2
    ours = lora.adapt(model.apply, spec)(params, trainable, ids, attention_mask=mask).logits
    base = model.apply({"params": params}, ids, attention_mask=mask).logits
    assert np.abs(np.asarray(ours - base))[mask == 1].max() > 100 * ATOL
    np.testing.assert_allclose(np.asarray(ours)[mask == 1], theirs[mask == 1], rtol=0, atol=ATOL)


def test_load_peft_roberta_with_classifier_matches_peft(roberta_dir, tmp_path, padded_batch):
    config = peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=8, lora_alpha=16,
                             target_modules=["query", "value"], use_rslora=True)
    torch.manual_seed(1)
    base = transformers.RobertaForSequenceClassification.from_pretrained(roberta_dir)
    peft_model = peft.get_peft_model(base, config)
    _perturb_torch_adapters(peft_model, 2)
    peft_model.save_pretrained(tmp_path / "adapter")
    ids, mask = padded_batch(101, pad_id=1)
    theirs = _torch_logits(peft_model.eval(), ids, mask)

    model, params, _ = load_pretrained(roberta_dir, task="classification", num_labels=3)
    spec, trainable = load_peft(tmp_path / "adapter", params, model_type="roberta",
                                task="classification")
    assert spec.rslora and set(traverse_util.flatten_dict(trainable["params"])) == {
        ("classifier", m, leaf) for m in ("dense", "out_proj") for leaf in ("kernel", "bias")}
    ours = lora.adapt(model.apply, spec)(params, trainable, ids, attention_mask=mask).logits
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=ATOL)


def _same_spec_semantics(a: lora.LoraSpec, b: lora.LoraSpec, params):
    kernels = lora.target_kernels(a, params)
    assert lora.target_kernels(b, params) == kernels
    for path in kernels:
        assert (a.rank_for(path), a.scale(path, a.rank_for(path))) == (
            b.rank_for(path), b.scale(path, b.rank_for(path)))
    assert a.dropout == b.dropout and a.rslora == b.rslora
    assert _trained_in_full(a, params) == _trained_in_full(b, params)


def _trained_in_full(spec: lora.LoraSpec, params) -> set:
    _, trainable = lora.split(spec, params, jax.random.key(0))
    return set(traverse_util.flatten_dict(trainable["params"]))


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_round_trip_plain_specs_exactly(gpt2_dir, roberta_dir, tmp_path):
    cases = [(gpt2_dir, GPT2_SPECS["plain"], "gpt2", None),
             (roberta_dir, ROBERTA_SPEC, "roberta", "classification")]
    for i, (base_dir, spec, model_type, task) in enumerate(cases):
        _, params, _ = load_pretrained(base_dir, task=task)
        _, trainable = lora.split(spec, params, jax.random.key(0))
        trainable = _perturbed(trainable, 1)
        out = export_peft(tmp_path / f"adapter{i}", spec, trainable, model_type=model_type,
                          task=task)
        loaded_spec, loaded = load_peft(out, params, model_type=model_type, task=task)
        _same_spec_semantics(spec, loaded_spec, params)
        _assert_trees_equal(loaded, trainable)


@pytest.mark.parametrize("name", ["split_qv", "split_qv_rslora"])
def test_round_trip_split_spec_gives_the_same_function(name, gpt2_dir, tmp_path):
    spec = GPT2_SPECS[name]
    _, params, _ = load_pretrained(gpt2_dir)
    frozen, trainable = lora.split(spec, params, jax.random.key(0))
    trainable = _perturbed(trainable, 1)
    out = export_peft(tmp_path / "adapter", spec, trainable, model_type="gpt2", task=None)
    loaded_spec, loaded = load_peft(out, params, model_type="gpt2")
    assert lora.target_kernels(loaded_spec, params) == lora.target_kernels(spec, params)
    expected = lora.merge(spec, frozen, trainable)
    got = lora.merge(loaded_spec, params, loaded)
    jax.tree_util.tree_map(lambda g, e: np.testing.assert_allclose(g, e, rtol=0, atol=1e-6),
                           got, expected)


# --- bad input -------------------------------------------------------------------------------


@pytest.fixture
def gpt2_export(gpt2_dir, tmp_path):
    """(params, adapter dir) for a plain c_attn adapter on the tiny GPT-2."""
    spec = GPT2_SPECS["plain"]
    _, params, _ = load_pretrained(gpt2_dir)
    _, trainable = lora.split(spec, params, jax.random.key(0))
    return params, export_peft(tmp_path / "adapter", spec, trainable, model_type="gpt2", task=None)


def test_missing_directory_and_files(gpt2_export, tmp_path):
    params, out = gpt2_export
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_peft(tmp_path / "nope", params, model_type="gpt2")
    (out / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_peft(out, params, model_type="gpt2")
    (out / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        load_peft(out, params, model_type="gpt2")


class _Trap:
    """Unpickling this creates a file: proof that a loader unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_pickle_weights_refused_without_unpickling(gpt2_export):
    params, out = gpt2_export
    sentinel = out.parent / "unpickled"
    (out / "adapter_model.safetensors").unlink()
    (out / "adapter_model.bin").write_bytes(pickle.dumps(_Trap(sentinel)))
    with pytest.raises(FileNotFoundError, match="did not unpickle"):
        load_peft(out, params, model_type="gpt2")
    assert not sentinel.exists()


@pytest.mark.parametrize("change, message", [
    ({"peft_type": "IA3"}, "'IA3' adapter"),
    ({"use_dora": True}, "use_dora"),
])
def test_unsupported_config_refused(gpt2_export, change, message):
    params, out = gpt2_export
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=message):
        load_peft(out, params, model_type="gpt2")


def _c_attn_adapter(layer: int, n_embd: int) -> dict:
    ab = {"lora_a": np.ones((4, n_embd), np.float32),
          "lora_b": np.ones((3 * n_embd, 4), np.float32)}
    return {"lora": {f"h_{layer}": {"attn": {"c_attn": ab}}}, "params": {}}


def test_adapter_from_a_bigger_model_names_param_and_shapes(gpt2_export, tmp_path):
    params, _ = gpt2_export
    out = export_peft(tmp_path / "big", GPT2_SPECS["plain"], _c_attn_adapter(0, 48),
                      model_type="gpt2", task=None)
    with pytest.raises(ValueError, match=r"h_0/attn/c_attn/kernel.*\(48, 144\).*\(32, 96\)"):
        load_peft(out, params, model_type="gpt2")


def test_adapter_for_a_missing_module_names_it(gpt2_export, tmp_path):
    params, _ = gpt2_export
    out = export_peft(tmp_path / "deep", GPT2_SPECS["plain"], _c_attn_adapter(5, 32),
                      model_type="gpt2", task=None)
    with pytest.raises(ValueError, match=r"no module 'transformer\.h\.5\.attn\.c_attn'"):
        load_peft(out, params, model_type="gpt2")


def test_export_refuses_to_overwrite_other_files(gpt2_export, tmp_path):
    params, out = gpt2_export
    spec = GPT2_SPECS["plain"]
    _, trainable = lora.split(spec, params, jax.random.key(0))
    trainable = _perturbed(trainable, 3)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt"):
        export_peft(user, spec, trainable, model_type="gpt2", task=None)
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    assert (user / "notes.txt").read_text() == "keep me"

    # An earlier export is replaced, and no staging directory is left behind.
    export_peft(out, spec, trainable, model_type="gpt2", task=None)
    _, loaded = load_peft(out, params, model_type="gpt2")
    _assert_trees_equal(loaded, trainable)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "gpt2", "mine"]


def test_export_refuses_gpt2_tied_embedding(gpt2_export, tmp_path):
    params, _ = gpt2_export
    spec = lora.LoraSpec(targets=(r"attn/c_attn",), rank=4, also_train=(r"^wte/",))
    _, trainable = lora.split(spec, params, jax.random.key(0))
    with pytest.raises(ValueError, match="tied to the LM head"):
        export_peft(tmp_path / "wte", spec, trainable, model_type="gpt2", task=None)
    assert not (tmp_path / "wte").exists()


# --- init_lora_weights, modules to save, heads ---------------------------------------------------

# Every value of PEFT's `init_lora_weights` (its LoraConfig's Literal, plus 'lora_ga', which PEFT
# accepts beside it), with what lora_jax does with an adapter saved that way: 'loads' (gives
# PEFT's logits on the same base) or 'refused' (names the config file, the value and a remedy).
INIT_VALUES = {
    True: "loads", False: "loads", "gaussian": "loads", "eva": "loads", "orthogonal": "loads",
    "mica": "loads", "nora": "loads", "olora": "loads", "pissa": "loads",
    "pissa_niter_4": "refused", "corda": "refused", "astra": "refused", "loftq": "refused",
    "lora_ga": "refused",
}
# PEFT cannot start these without calibration data or a quantisation setup: their configs are
# written by hand (a plain save with the value set).
_HAND_WRITTEN = ("corda", "astra", "loftq")


def test_init_values_cover_peft():
    """A value a newer PEFT adds fails here until it is classified (lora_peft refuses it until
    then, as a value it does not know)."""
    def values(hint):
        args = typing.get_args(hint)
        return [v for a in args for v in (values(a) if typing.get_args(a) else [a])]

    hint = typing.get_type_hints(peft.LoraConfig)["init_lora_weights"]
    known = {str(v).lower() for v in INIT_VALUES} | {"pissa_niter_[number of iters]"}
    assert {str(v).lower() for v in values(hint) if v is not bool} <= known


ROBERTA_LORA = dict(task_type=peft.TaskType.SEQ_CLS, target_modules=["query", "value"])


def _save_peft_lora(hf_class, base_dir, out, init, **config):
    """A PEFT LoRA adapter (rank 4, alpha 8) started with `init`, A, B and any head perturbed so
    they matter; returns PEFT's own model loaded back from the file (None: hand-written)."""
    value = True if init in _HAND_WRITTEN else init
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(hf_class.from_pretrained(base_dir), peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=value, **config))
    _perturb_torch_adapters(peft_model, 2)
    peft_model.save_pretrained(out)
    if init in _HAND_WRITTEN:
        _set_init(out, init)
        return None
    return _peft_model(hf_class, base_dir, out)


def _set_init(adapter, init) -> None:
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "init_lora_weights": init}))


def _exported_logits(adapter, params, model, family, task, ids, mask) -> np.ndarray:
    """Logits of `adapter` read by `exports.load`, as `AdapterSet.load` and `evaluate` read it."""
    stack, trainable = exports.load(adapter, params, model_family(family), task)
    apply = stack.adapt(model.apply)
    return np.asarray(apply(stack.frozen(params, trainable), trainable, ids,
                            attention_mask=mask).logits)


@pytest.mark.parametrize("init", list(INIT_VALUES), ids=str)
def test_every_init_lora_weights_loads_as_peft_or_is_refused(init, roberta_dir, tmp_path,
                                                             padded_batch):
    out = tmp_path / "adapter"
    peft_model = _save_peft_lora(transformers.RobertaForSequenceClassification, roberta_dir, out,
                                 init, **ROBERTA_LORA)
    model, params, _ = load_pretrained(roberta_dir, task="classification", num_labels=3)
    ids, mask = padded_batch(101, pad_id=1)
    if INIT_VALUES[init] == "refused":
        for load in (lambda: exports.load(out, params, model_family("roberta"), "classification"),
                     lambda: load_peft(out, params, model_type="roberta", task="classification")):
            with pytest.raises(FileFormatError) as error:
                load()
            message = str(error.value)
            assert message.startswith(f"{out}/adapter_config.json: init_lora_weights {init!r}")
            assert "\n" not in message and ("path_initial_model_for_weight_conversion" in message
                                            or "merge_and_unload" in message)
        return
    ours = _exported_logits(out, params, model, "roberta", "classification", ids, mask)
    np.testing.assert_allclose(ours, _torch_logits(peft_model, ids, mask), rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", ["roberta", "gpt2"])
def test_olora_adapter_gives_peft_logits(family, roberta_dir, gpt2_dir, tmp_path, padded_batch):
    """OLoRA trains against W0 - s Q_r R_r (QR of W0^T): read as PEFT's conversion, a rank-2r
    LoRA on W0, it gives PEFT's logits, by `exports.load` and `load_peft` alike; on GPT-2's
    Conv1D (fan_in_fan_out) too, which PEFT factors as W0^T since 0.22."""
    out = tmp_path / "adapter"
    if family == "roberta":
        peft_model = _save_peft_lora(
            transformers.RobertaForSequenceClassification, roberta_dir, out, "olora",
            alpha_pattern={"layer.1.attention.self.value": 5},
            rank_pattern={"layer.0.attention.self.query": 2}, **ROBERTA_LORA)
        model, params, _ = load_pretrained(roberta_dir, task="classification", num_labels=3)
        task, ids, mask = "classification", *padded_batch(101, pad_id=1)
    else:
        peft_model = _save_peft_lora(transformers.GPT2LMHeadModel, gpt2_dir, out, "olora",
                                     target_modules=["attn.c_attn", "attn.c_proj"],
                                     fan_in_fan_out=True)
        model, params, _ = load_pretrained(gpt2_dir)
        task, ids, mask = None, *padded_batch(97)
    theirs = _torch_logits(peft_model, ids, mask)
    real = mask == 1 if task is None else np.s_[:]  # an LM's padded positions do not count
    ours = _exported_logits(out, params, model, family, task, ids, mask)
    np.testing.assert_allclose(ours[real], theirs[real], rtol=0, atol=ATOL)
    spec, trainable = load_peft(out, params, model_type=family, task=task)
    as_lora = lora.adapt(model.apply, spec)(params, trainable, ids, attention_mask=mask).logits
    np.testing.assert_allclose(np.asarray(as_lora)[real], theirs[real], rtol=0, atol=ATOL)
    _set_init(out, True)  # the same tensors as a LoRA on W0: far from PEFT's function
    plain = _exported_logits(out, params, model, family, task, ids, mask)
    assert np.abs(plain - theirs)[real].max() > 100 * ATOL


OLORA_PEFT_0212 = pathlib.Path(__file__).parent / "data" / "olora_gpt2_peft0212"


def _olora_0212(tmp_path, peft_version=...):
    """A copy of PEFT 0.21.2's GPT-2 OLoRA adapter (`data/olora_gpt2_peft0212/make.py`), its
    peft_version replaced (... keeps it; None removes it); (adapter, base params, model,
    reference npz)."""
    out = tmp_path / "adapter"
    shutil.copytree(OLORA_PEFT_0212 / "adapter", out)
    if peft_version is not ...:
        config = json.loads((out / "adapter_config.json").read_text())
        config.pop("peft_version")
        if peft_version is not None:
            config["peft_version"] = peft_version
        (out / "adapter_config.json").write_text(json.dumps(config))
    model, params, _ = load_pretrained(OLORA_PEFT_0212 / "base")
    return out, params, model, np.load(OLORA_PEFT_0212 / "reference.npz")


@pytest.mark.parametrize("peft_version", [..., None, "0.21.3.dev0@1a2b3c"],
                         ids=["as_saved", "before_0.18_no_field", "a_dev_build"])
def test_olora_gpt2_file_of_peft_before_022_keeps_its_function(tmp_path, peft_version):
    """PEFT before 0.22 factored GPT-2's stored Conv1D kernel, not W0^T; a file it saved (its
    `peft_version` says so; configs before PEFT 0.18 have none) is read as the function it was
    trained on: PEFT 0.21.2's own logits, recorded by `make.py`. PEFT 0.22 itself reads such a
    file as if it had factored W0^T, which is another function."""
    out, params, model, reference = _olora_0212(tmp_path, peft_version)
    ids, mask, theirs = reference["input_ids"], reference["attention_mask"], reference["logits"]
    real = mask == 1
    ours = _exported_logits(out, params, model, "gpt2", None, ids, mask)
    np.testing.assert_allclose(ours[real], theirs[real], rtol=0, atol=ATOL)
    spec, trainable = load_peft(out, params, model_type="gpt2", task=None)
    as_lora = lora.adapt(model.apply, spec)(params, trainable, ids, attention_mask=mask).logits
    np.testing.assert_allclose(np.asarray(as_lora)[real], theirs[real], rtol=0, atol=ATOL)
    peft_022 = _torch_logits(_peft_model(transformers.GPT2LMHeadModel, OLORA_PEFT_0212 / "base",
                                         out), ids, mask)
    assert np.abs(peft_022 - theirs)[real].max() > 100 * ATOL


def test_olora_gpt2_file_with_an_unreadable_peft_version_is_refused(tmp_path):
    out, params, _, _ = _olora_0212(tmp_path, "nightly")
    message = (rf"^{out}/adapter_config.json: peft_version 'nightly' is not a version, and PEFT's "
               "OLoRA start")
    with pytest.raises(FileFormatError, match=message):
        load_peft(out, params, model_type="gpt2", task=None)
    with pytest.raises(FileFormatError, match=message):
        exports.load(out, params, model_family("gpt2"), None)


def test_dora_olora_adapter_gives_peft_logits(roberta_dir, tmp_path, padded_batch):
    """DoRA normalises W_res + s B A = W0 + s' B' A', so the conversion carries over."""
    out = tmp_path / "adapter"
    peft_model = _save_peft_lora(transformers.RobertaForSequenceClassification, roberta_dir, out,
                                 "olora", use_dora=True, **ROBERTA_LORA)
    model, params, _ = load_pretrained(roberta_dir, task="classification", num_labels=3)
    ids, mask = padded_batch(101, pad_id=1)
    ours = _exported_logits(out, params, model, "roberta", "classification", ids, mask)
    np.testing.assert_allclose(ours, _torch_logits(peft_model, ids, mask), rtol=0, atol=ATOL)


def test_a_module_to_save_without_tensors_is_refused(roberta_dir, tmp_path):
    """PEFT's SEQ_CLS save lists every task head name it knows in modules_to_save ('classifier',
    'score', from 0.22 'pre_classifier'); a copy that lost the classifier's tensors would run on
    the base's untrained head (PEFT raises as well). The others, which name no module of RoBERTa,
    stay ignored."""
    out = tmp_path / "adapter"
    _save_peft_lora(transformers.RobertaForSequenceClassification, roberta_dir, out, True,
                    **ROBERTA_LORA)
    saved = json.loads((out / "adapter_config.json").read_text())["modules_to_save"]
    assert "classifier" in saved and {"score", "pre_classifier"} <= set(saved)
    _, params, _ = load_pretrained(roberta_dir, task="classification", num_labels=3)
    load_peft(out, params, model_type="roberta", task="classification")  # the others: ignored
    weights = out / "adapter_model.safetensors"
    tensors = safetensors.numpy.load_file(weights)
    safetensors.numpy.save_file({k: v for k, v in tensors.items() if ".classifier." not in k},
                                weights, metadata={"format": "pt"})
    message = rf"^{weights} has no tensors of module 'classifier', .*modules_to_save 'classifier'"
    with pytest.raises(FileFormatError, match=message):
        load_peft(out, params, model_type="roberta", task="classification")
    with pytest.raises(FileFormatError, match=message):
        exports.load(out, params, model_family("roberta"), "classification")


def test_a_head_of_another_size_names_file_tensor_and_shapes(roberta_dir, tmp_path):
    _, params, _ = load_pretrained(roberta_dir, task="classification", num_labels=3)
    _, trainable = lora.split(ROBERTA_SPEC, params, jax.random.key(0))
    out = export_peft(tmp_path / "adapter", ROBERTA_SPEC, trainable, model_type="roberta",
                      task="classification")
    weights = out / "adapter_model.safetensors"
    tensors = safetensors.numpy.load_file(weights)
    key = "base_model.model.classifier.out_proj.weight"
    assert tensors[key].shape == (3, 32)
    tensors[key] = np.ones((5, 32), np.float32)  # a head for 5 labels
    safetensors.numpy.save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(FileFormatError) as error:
        load_peft(out, params, model_type="roberta", task="classification")
    assert str(error.value).startswith(f"{weights}: tensor {key!r} has shape (5, 32), but this "
                                       "roberta model's classifier/out_proj/kernel needs (3, 32)")
    assert "\n" not in str(error.value)
