"""A quantized frozen base (config.model.quantize): kernels held quantized in the params tree,
dequantized per matmul inside the step; methods that read W0 over it; a LoRA step over nf4
equal to one over the dequantized weights; PEFT over the same dequantized weights giving our
logits; the refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import traverse_util

from lora_jax import config_checks
from lora_jax.config import base_config, load_config, set_dotted
from lora_jax.errors import ConfigError
from lora_jax.interop import hub
from lora_jax.methods import METHODS, MethodStack, count_params, lora
from lora_jax.methods.lora_peft import export_peft
from lora_jax.models import lm_loss
from lora_jax.quant import kernels as quant
from conftest import REPO_ROOT, calibrated
from parity import jax_steps, token_batches
from test_llama import BASE, HF_CLASSES, save_hf

FORMATS = ("int8", "nf4", "nf4-nested")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Widths that fill nf4's blocks of 64 and bitsandbytes' nested blocks of 256 more than once;
# biases everywhere, which the quantized Dense adds and BitFit would train.
CONFIG = BASE | dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                     num_key_value_heads=2, attention_bias=True, mlp_bias=True)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    save_hf(HF_CLASSES["llama"][0](**CONFIG), path)
    return path


def dequantized(params):
    """The tree with every quantized kernel replaced by its dequantized values."""
    return jax.tree_util.tree_map(quant.value, params, is_leaf=quant.is_quantized)


def quantized_paths(params):
    return sorted("/".join(p) for p, leaf in traverse_util.flatten_dict(params).items()
                  if quant.is_quantized(leaf))


@pytest.mark.parametrize("fmt", FORMATS)
def test_loading_quantizes_the_block_kernels_only(llama_dir, fmt):
    """Every Dense kernel inside the blocks is held quantized, nothing else is; the stored
    arrays take the bytes of the format, and the dequantized values are the format's."""
    _, params, _ = hub.load_pretrained(llama_dir, quantize=fmt)
    _, full, _ = hub.load_pretrained(llama_dir)
    flat, full_flat = traverse_util.flatten_dict(params), traverse_util.flatten_dict(full)
    block_kernels = sorted("/".join(p) for p in full_flat
                           if p[-1] == "kernel" and "/layers_" in "/".join(p))
    assert quantized_paths(params) == block_kernels and len(block_kernels) == 14
    assert count_params(params) == count_params(full)  # weights held, not stored parts
    for path, leaf in flat.items():
        if not quant.is_quantized(leaf):
            np.testing.assert_array_equal(leaf, full_flat[path])
            continue
        w = np.asarray(full_flat[path]).T
        expected = quant.FORMATS[fmt].dequantize(
            {k: jnp.asarray(v) for k, v in quant.FORMATS[fmt].quantize(w).items()}, w.shape)
        np.testing.assert_array_equal(leaf.dequantize(), np.asarray(expected).T)
        assert leaf.nbytes < (w.size if fmt == "int8" else w.size / 2) * 1.2
    kernel_bytes = sum(flat[tuple(p.split("/"))].nbytes for p in block_kernels)
    fp32_bytes = sum(full_flat[tuple(p.split("/"))].nbytes for p in block_kernels)
    assert kernel_bytes <= (0.3 if fmt == "int8" else 0.16) * fp32_bytes


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_forward_equals_the_dequantized_models(llama_dir, fmt, padded_batch):
    """The model over quantized kernels computes what it computes over their dequantized
    values (same products, summed alike), and differs from the fp32 model (it is quantized)."""
    model, params, _ = hub.load_pretrained(llama_dir, quantize=fmt)
    _, full, _ = hub.load_pretrained(llama_dir)
    ids, mask = padded_batch(BASE["vocab_size"])
    forward = jax.jit(lambda p: model.apply({"params": p}, ids, mask).logits)
    ours, reference = forward(params), forward(dequantized(params))
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5)
    assert np.abs(np.asarray(forward(full)) - np.asarray(ours)).max() > 1e-4


def _lora_run(model, params, spec, batches):
    frozen, trainable = lora.split(spec, params, jax.random.key(0))
    apply = lora.adapt(model.apply, spec)

    def loss_fn(frozen, trainable, batch, rng):
        ids, mask = batch
        logits = apply(frozen, trainable, ids, mask, lora_rng=rng).logits
        return lm_loss(logits, ids, mask)

    return jax_steps(loss_fn, frozen, trainable, batches)


@pytest.mark.parametrize("fmt", ["nf4", "nf4-nested"])
def test_lora_steps_over_nf4_equal_steps_over_its_dequantized_weights(llama_dir, fmt):
    """The acceptance point: 5 AdamW steps of LoRA (q, k, v, o and the MLP, dropout on) over the
    nf4 base give the losses and adapters of the same steps over the dequantized fp32 base."""
    model, params, _ = hub.load_pretrained(llama_dir, quantize=fmt)
    spec = lora.LoraSpec(targets=tuple(ATTENTION) + ("gate_proj", "down_proj"), rank=4,
                         alpha=8.0, dropout=0.1)
    batches = [(jnp.asarray(i), jnp.asarray(m))
               for i, m in token_batches(BASE["vocab_size"], 5, 4, 12, seed=0)]
    losses, trained = _lora_run(model, params, spec, batches)
    ref_losses, ref_trained = _lora_run(model, dequantized(params), spec, batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    for ours, theirs in zip(jax.tree_util.tree_leaves(trained),
                            jax.tree_util.tree_leaves(ref_trained)):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_a_train_step_keeps_no_dequantized_copy_between_forward_and_backward(llama_dir):
    """The gradient's jaxpr saves only the stored parts for the backward pass: every dequantized
    kernel is made inside a remat (`quant.matmul`), so none is a residual of the forward."""
    model, params, _ = hub.load_pretrained(llama_dir, quantize="nf4")
    spec = lora.LoraSpec(targets=tuple(ATTENTION), rank=4, alpha=8.0)
    frozen, trainable = lora.split(spec, params, jax.random.key(0))
    apply = lora.adapt(model.apply, spec)
    ids, mask = (jnp.asarray(a) for a in token_batches(BASE["vocab_size"], 1, 2, 8, 0)[0])

    def loss(trainable):
        return lm_loss(apply(frozen, trainable, ids, mask).logits, ids, mask)

    _, vjp = jax.vjp(loss, trainable)
    residuals = [leaf for leaf in jax.tree_util.tree_leaves(vjp)
                 if hasattr(leaf, "shape") and leaf.dtype == jnp.float32]
    kernel_shapes = {leaf.shape for leaf in traverse_util.flatten_dict(frozen).values()
                     if quant.is_quantized(leaf)}
    kernel_shapes |= {s[::-1] for s in kernel_shapes}
    saved = [r.shape for r in residuals if tuple(r.shape) in kernel_shapes]
    assert not saved, f"dequantized kernels kept for the backward pass: {saved}"


@pytest.mark.parametrize("method", ["dora", "pissa", "vera", "adalora", "adapter_h",
                                    "prelayer"])
def test_methods_that_read_w0_run_over_a_quantized_base(llama_dir, method, padded_batch):
    """Each such method trains over the nf4 base exactly as over its dequantized weights."""
    model, params, _ = hub.load_pretrained(llama_dir, quantize="nf4")
    c = base_config()
    section = c.method[method]
    if "targets" in section:
        section.targets = ("/q_proj/kernel", "/v_proj/kernel")
    # PreLayer's start is taken once, over the nf4 base as a run takes it.
    stack = calibrated(MethodStack((METHODS[method].build(section, _family()),)), model.apply,
                       params, BASE["vocab_size"])
    ids, mask = padded_batch(BASE["vocab_size"])
    outputs = []
    for base in (params, dequantized(params)):
        frozen, trainable = stack.split(base, jax.random.key(0))
        trainable = jax.tree_util.tree_map(lambda x: x + 0.05, trainable)  # not the identity
        outputs.append(np.asarray(stack.adapt(model.apply)(frozen, trainable, ids, mask).logits))
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=0, atol=1e-5)


def _family():
    from lora_jax.models import family

    return family("llama")


def test_peft_over_the_same_dequantized_weights_gives_our_logits(llama_dir, tmp_path,
                                                                 padded_batch):
    """A LoRA adapter trained over the nf4 base, exported in PEFT's format and loaded by PEFT
    over transformers' model holding the same dequantized weights, gives our logits."""
    model, params, _ = hub.load_pretrained(llama_dir, quantize="nf4")
    spec = lora.LoraSpec(targets=tuple(ATTENTION), rank=4, alpha=8.0)
    batches = [(jnp.asarray(i), jnp.asarray(m))
               for i, m in token_batches(BASE["vocab_size"], 3, 4, 12, seed=0)]
    _, trained = _lora_run(model, params, spec, batches)
    frozen, _ = lora.split(spec, params, jax.random.key(0))
    ids, mask = padded_batch(BASE["vocab_size"])
    ours = np.asarray(lora.adapt(model.apply, spec)(frozen, trained, ids, mask).logits)

    torch_model = HF_CLASSES["llama"][1].from_pretrained(llama_dir).eval()
    state = torch_model.state_dict()
    for path, leaf in traverse_util.flatten_dict(params).items():
        if quant.is_quantized(leaf):
            key = hub.hf_keys(path, "llama")[0]
            state[key] = torch.from_numpy(np.asarray(leaf.torch_weight()))
    torch_model.load_state_dict(state)
    out = export_peft(tmp_path / "adapter", spec, trained, model_type="llama", task=None)
    peft_model = peft.PeftModel.from_pretrained(torch_model, out).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.from_numpy(ids),
                            attention_mask=torch.from_numpy(mask)).logits.numpy()
    np.testing.assert_allclose(ours[mask == 1], theirs[mask == 1], rtol=0, atol=1e-4)


def _config(llama_dir, **fields):
    """configs/instruct.py's config (LoRA on q, k, v, o) over the tiny checkpoint."""
    c = load_config(str(REPO_ROOT / "configs" / "instruct.py") + ":model=tiny")
    c.model.name = str(llama_dir)
    c.model.tokenizer = None
    c.data.path = "unused.json"
    for dotted, value in fields.items():
        set_dotted(c, dotted, value)
    return c


@pytest.mark.parametrize("method", ["full", "top_layers", "bitfit"])
def test_training_quantized_leaves_in_full_is_refused(llama_dir, method):
    """Full fine-tuning and BitFit over a quantized base are refused, naming the option, before
    anything is written (the check the trainer runs once the base is loaded)."""
    c = _config(llama_dir, **{"model.quantize": "nf4", "method.use": (method,)})
    model, params, _ = hub.load_pretrained(llama_dir, quantize="nf4")
    with pytest.raises(ConfigError, match=r"config\.model\.quantize = 'nf4'.*" + method):
        config_checks.check_against_base(c, params, _family())
    config_checks.check_against_base(_config(llama_dir), params, _family())  # LoRA: fine


@pytest.mark.parametrize("fields, message", [
    ({"model.quantize": "gguf"}, r"model\.quantize = 'gguf'.*not a GGUF file"),
    ({"model.quantize": "nf5"}, r"model\.quantize = 'nf5'"),
    ({"model.double_quant": True}, r"model\.double_quant = True.*'none'"),
    ({"model.quantize": "int8", "model.name": ""}, r"model\.quantize = 'int8'.*random"),
])
def test_quantize_options_that_cannot_apply_are_refused(llama_dir, fields, message):
    c = _config(llama_dir, **fields)
    with pytest.raises(ConfigError, match=message):
        config_checks.check_config(c, device_count=1)


def test_quantize_gguf_of_a_safetensors_checkpoint_is_refused_by_the_loader(llama_dir):
    with pytest.raises(ValueError, match="not a GGUF file"):
        hub.load_pretrained(llama_dir, quantize="gguf")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(64, 96), (33, 7), (1024, 520)])
def test_abstract_kernels_have_the_shapes_quantize_stores(fmt, shape):
    """What the 7B plan counts (`quant.abstract`) is what `quantize` stores."""
    w = np.random.default_rng(0).normal(size=shape[::-1]).astype(np.float32)
    real = quant.quantize(w, fmt)
    shapes = quant.abstract(jax.ShapeDtypeStruct(shape, jnp.bfloat16), fmt)
    assert shapes.shape == real.shape == shape and shapes.format == real.format
    assert {k: (v.shape, v.dtype) for k, v in shapes.parts.items()} == {
        k: (v.shape, v.dtype) for k, v in real.parts.items()}


def test_the_compiled_step_never_holds_the_dequantized_kernels_together(tmp_path):
    """XLA's memory analysis of a LoRA gradient: over the nf4 base the step's temporaries exceed
    the fp32 base's by about one kernel's transient (each dequantized as its matmul needs it),
    not by the block kernels' fp32 size (XLA:CPU hoisted every dequantization to the start
    before `quant.matmul` tied each to its data)."""
    save_hf(HF_CLASSES["llama"][0](**(BASE | dict(
        hidden_size=256, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2))), tmp_path)
    spec = lora.LoraSpec(targets=tuple(ATTENTION), rank=4, alpha=8.0)
    ids = jnp.ones((2, 16), jnp.int32)
    temp, kernel_bytes = {}, 0
    for fmt in ("none", "nf4"):
        model, params, _ = hub.load_pretrained(tmp_path, quantize=fmt)
        frozen, trainable = lora.split(spec, params, jax.random.key(0))
        apply = lora.adapt(model.apply, spec)

        def loss(trainable, frozen):
            return lm_loss(apply(frozen, trainable, ids).logits, ids, jnp.ones_like(ids))

        compiled = jax.jit(jax.grad(loss)).lower(trainable, frozen).compile()
        temp[fmt] = compiled.memory_analysis().temp_size_in_bytes
        if fmt == "nf4":
            kernel_bytes = sum(4 * leaf.size for leaf in traverse_util.flatten_dict(
                frozen).values() if quant.is_quantized(leaf))
    largest = 4 * 256 * 512
    assert kernel_bytes > 20 * largest
    assert temp["nf4"] - temp["none"] < 3 * largest, (temp, kernel_bytes)


def test_gpt2s_conv1d_kernels_quantize_in_their_torch_layout(tmp_path, padded_batch):
    """GPT-2 stores its kernels as we do, (d_in, d_out): quantized as W = kernel^T like every
    family's, its model over nf4 computes what it computes over the dequantized kernels."""
    from conftest import save_tiny_hf_gpt2

    save_tiny_hf_gpt2(tmp_path)
    model, params, _ = hub.load_pretrained(tmp_path, quantize="nf4")
    _, full, _ = hub.load_pretrained(tmp_path)
    flat, full_flat = traverse_util.flatten_dict(params), traverse_util.flatten_dict(full)
    assert quantized_paths(params) == sorted(
        "/".join(p) for p in full_flat if p[-1] == "kernel")  # every kernel is in a block
    for path in quantized_paths(params):
        key = tuple(path.split("/"))
        w = np.asarray(full_flat[key]).T
        np.testing.assert_array_equal(
            flat[key].parts["absmax"], quant.FORMATS["nf4"].quantize(w)["absmax"])
    ids, mask = padded_batch(97)
    forward = jax.jit(lambda p: model.apply({"params": p}, ids, mask).logits)
    np.testing.assert_allclose(forward(params), forward(dequantized(params)), rtol=0, atol=1e-5)
