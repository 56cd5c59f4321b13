"""LoftQ as a method (methods/loftq.py) and a quantized base through the trainer: LoftQ's adapters
and quantized base are its alternation's on each target (whose numerics match PEFT's loop:
tests/test_loftq_numerics.py) and PEFT's own LoftQ config's on a model, it starts nearer the
full-precision model than QLoRA, and QLoRA and LoftQ runs train over an nf4 base with `train`."""

import json
import math

import jax
import numpy as np
import pytest
from flax import traverse_util

from lora_jax.config import base_config
from lora_jax.interop import hub
from lora_jax.methods import METHODS, MethodStack, lora
from lora_jax.methods.loftq import loftq_factors
from lora_jax.models import family
from lora_jax.quant import kernels as quant, nf4
from test_instruct import instruct_config, records, write_jsonl
from test_llama import HF_CLASSES, save_hf
from test_quantized_base import CONFIG

TARGETS = ("/q_proj/kernel", "/v_proj/kernel")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    save_hf(HF_CLASSES["llama"][0](**CONFIG), path)
    return path


def _loftq(iterations: int, rank: int = 4, alpha: float = 8.0) -> MethodStack:
    c = base_config().method.loftq
    c.targets, c.rank, c.alpha, c.iterations = TARGETS, rank, alpha, iterations
    return MethodStack((METHODS["loftq"].build(c, family("llama")),))


@pytest.mark.parametrize("iterations", [1, 3])
def test_loftq_holds_its_alternations_quantized_base_and_adapters(llama_dir, iterations):
    """For every target: the frozen kernel is Q_T in nf4 and the adapters are A_T, B_T, exactly
    as `loftq_factors` gives them from the original weight (scale alpha / r = 2)."""
    _, params, _ = hub.load_pretrained(llama_dir)
    frozen, trainable = _loftq(iterations).split(params, jax.random.key(0))
    flat, flat_frozen = (traverse_util.flatten_dict(t) for t in (params, frozen))
    adapters = lora.adapter_modules({"lora": trainable["loftq"]})
    assert len(adapters) == 4
    for module, ab in adapters.items():
        parts, a, b = loftq_factors(np.asarray(flat[module + ("kernel",)]).T, 4, iterations,
                                    nf4.quantize, nf4.dequantize, scale=2.0)
        held = flat_frozen[module + ("kernel",)]
        assert quant.is_quantized(held) and held.format == "nf4"
        for name, value in parts.items():
            np.testing.assert_array_equal(held.parts[name], value)
        np.testing.assert_array_equal(ab["lora_a"], a)
        np.testing.assert_array_equal(ab["lora_b"], b)
    untouched = [p for p in flat if p[-1] == "kernel" and "k_proj" in p]
    assert untouched and all(flat_frozen[p] is flat[p] or np.array_equal(flat_frozen[p], flat[p])
                             for p in untouched)


@pytest.mark.parametrize("iterations", [1, 3])
def test_loftq_equals_peft_loftq_config_on_a_tiny_llama(llama_dir, iterations):
    """Model level, where PEFT runs: `get_peft_model` with `LoftQConfig` (4 bits, the same
    iterations) on transformers' model of the checkpoint against our LoftQ from its config.
    Each target's A and B (signs aligned to PEFT's), its base Q and the residual W - Q - B A
    within 1e-4. Scale 1 (alpha = r): PEFT sets A and B unscaled, and at another scale its
    start is Q + s B A, not LoftQ's Q + B A (ours divides by s, as the paper means)."""
    peft = pytest.importorskip("peft")
    from test_loftq_numerics import TOL, _sign_aligned

    rank = 4
    torch_model = HF_CLASSES["llama"][1].from_pretrained(llama_dir)
    peft_model = peft.get_peft_model(torch_model, peft.LoraConfig(
        init_lora_weights="loftq", r=rank, lora_alpha=rank, target_modules=["q_proj", "v_proj"],
        loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=iterations)))
    _, params, _ = hub.load_pretrained(llama_dir)
    frozen, trainable = _loftq(iterations, rank=rank, alpha=float(rank)).split(
        params, jax.random.key(0))
    flat_frozen, flat = traverse_util.flatten_dict(frozen), traverse_util.flatten_dict(params)
    adapters = lora.adapter_modules({"lora": trainable["loftq"]})
    theirs = dict(peft_model.named_modules())
    for module, ab in adapters.items():
        layer = theirs["base_model.model." + hub.hf_keys(module + ("kernel",), "llama")[0]
                       .removesuffix(".weight")]
        a_ref = layer.lora_A["default"].weight.detach().cpu().numpy()
        b_ref = layer.lora_B["default"].weight.detach().cpu().numpy()
        base_ref = layer.get_base_layer().weight.detach().cpu().numpy()
        w = np.asarray(flat[module + ("kernel",)]).T
        base = np.asarray(quant.value(flat_frozen[module + ("kernel",)])).T
        a, b = _sign_aligned(np.asarray(ab["lora_a"]), np.asarray(ab["lora_b"]), a_ref)
        np.testing.assert_allclose(base, base_ref, **TOL)
        np.testing.assert_allclose(a, a_ref, **TOL)
        np.testing.assert_allclose(b, b_ref, **TOL)
        np.testing.assert_allclose(w - base - b @ a, w - base_ref - b_ref @ a_ref, **TOL)
    assert len(adapters) == 4


def test_loftq_starts_nearer_the_full_precision_model_than_qlora(llama_dir, padded_batch):
    """The point of LoftQ: Q + s B A is closer to W than QLoRA's Q alone, and so are the
    logits."""
    model, params, _ = hub.load_pretrained(llama_dir)
    ids, mask = padded_batch(CONFIG["vocab_size"])
    full = np.asarray(model.apply({"params": params}, ids, mask).logits)

    def error(stack):
        frozen, trainable = stack.split(params, jax.random.key(0))
        out = np.asarray(stack.adapt(model.apply)(frozen, trainable, ids, mask).logits)
        return np.abs(out - full)[mask == 1].mean()

    qlora_frozen = {p: (quant.quantize(np.asarray(v).T, "nf4") if p[-1] == "kernel" and any(
        t.strip("/").split("/")[0] in p for t in TARGETS) else v)
        for p, v in traverse_util.flatten_dict(params).items()}
    qlora = np.asarray(model.apply({"params": traverse_util.unflatten_dict(qlora_frozen)}, ids,
                                   mask).logits)
    qlora_error = np.abs(qlora - full)[mask == 1].mean()
    # Random weights have flat spectra, so a rank-4 correction takes a small share of the
    # quantization error (the gain grows with rank and steps); it must be a gain all the same.
    assert error(_loftq(1)) < qlora_error
    assert error(_loftq(5, rank=16)) < 0.8 * error(_loftq(1))


@pytest.mark.parametrize("method", ["lora", "loftq"])
def test_qlora_and_loftq_train_over_an_nf4_base(tmp_path, data_dir, method):
    """`train` over a tiny Llama checkpoint with model.quantize 'nf4': the block kernels are held
    at nf4 (LoftQ's targets in LoftQ's own nf4), the loss falls, and the run is recorded."""
    from lora_jax.train import train
    from lora_jax.training import setup

    ckpt = tmp_path / "llama"
    save_hf(HF_CLASSES["llama"][0](**(CONFIG | dict(vocab_size=50257))), ckpt)
    path = write_jsonl(tmp_path / "alpaca.jsonl", records(16))
    c = instruct_config(path, data_dir, **{
        "model.name": str(ckpt), "model.quantize": "nf4", "method.use": (method,),
        "data.eval_fraction": 0.25, "data.batch_size": 4, "data.eval_batch_size": 4,
        "data.max_len": 64, "optim.lr": 1e-2, "optim.warmup_steps": 1, "train.max_steps": 8,
        "train.log_every": 1, "train.eval_every": 8, "train.checkpoint_every": 8})
    if method == "loftq":
        c.method.loftq.targets = c.method.lora.targets
        assert setup.original_kernels(c) == tuple(c.method.lora.targets)
    base = setup.base(c)
    flat = traverse_util.flatten_dict(base.params)
    held = {"/".join(p) for p, v in flat.items() if quant.is_quantized(v)}
    block_kernels = {"/".join(p) for p in flat if p[-1] == "kernel" and "layers_" in "/".join(p)}
    expected = (block_kernels if method == "lora"
                else {p for p in block_kernels if "self_attn" not in p})
    assert held == expected  # LoftQ's targets arrive unquantized: it quantizes them itself
    result = train(c, tmp_path / "run")
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if r["split"] == "train"]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) < sum(losses[:2]) and math.isfinite(result["loss"])
