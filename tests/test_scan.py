"""Scanned blocks (config.model.scan_layers, lora_jax/models/scan.py): the Llama family's blocks run
as one nn.scan over the same params tree, with the same logits, gradients, decoding and trained
adapters as the unrolled model, every method's interception working inside the scan (blocks that
compute differently too); what cannot scan (layers with different windows, a family without
scanning) is refused, named."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import transformers

from lora_jax import generate, methods
from lora_jax.config import TINY_MODELS, load_config
from lora_jax.config_checks import check_config
from lora_jax.errors import ConfigError
from lora_jax.interop import hub
from lora_jax.methods import METHODS
from lora_jax.models import family as model_family
from lora_jax.models.llama import LlamaConfig
from lora_jax.quant import kernels as quant
from lora_jax.train import train
from conftest import REPO_ROOT, calibrated, tiny_config
from test_instruct import instruct_config, records, write_jsonl
from test_llama import BASE, HF_CLASSES, save_hf
from test_methods import model_of, tiny_section

# Tiny Qwen2 (Llama's blocks with q/k/v biases) and three blocks, so that a scan has a middle.
FIELDS = {k: v for k, v in TINY_MODELS["llama"].items() if k != "model_type"} | dict(
    num_hidden_layers=3)


def models(model_type="qwen2", **fields):
    """(unrolled, scanned) models of one config, and the params (the unrolled model's init)."""
    unrolled = model_of(model_type, **(FIELDS | fields))
    scanned = unrolled.clone(config=dataclasses.replace(unrolled.config, scan_layers=True))
    params = unrolled.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
    return unrolled, scanned, params


def close(a, b, atol=1e-5):
    """Equal to `atol` relative to the larger's scale, leaf by leaf."""
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        np.testing.assert_allclose(x, y, rtol=0, atol=atol * max(1.0, float(np.abs(x).max())))


@pytest.mark.parametrize("tied, remat", [(False, False), (True, True)])
def test_scanned_blocks_compute_the_unrolled_model(tied, remat, padded_batch):
    """Logits, every hidden state, the params' gradients and cached decoding are the unrolled
    model's (tied or not, blocks recomputed in the backward pass or not); a scanned init comes
    out in the unrolled layout, and `hub.init_params` draws the unrolled model's values."""
    unrolled, scanned, params = models(tie_word_embeddings=tied)
    unrolled, scanned = (m.clone(config=dataclasses.replace(m.config, remat=remat))
                         for m in (unrolled, scanned))
    fresh = scanned.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
    assert jax.tree_util.tree_map(jnp.shape, fresh) == jax.tree_util.tree_map(jnp.shape, params)
    drawn = hub.init_params(scanned, jax.random.key(0))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(drawn),
                                                    jax.tree_util.tree_leaves(params), strict=True))
    ids, mask = padded_batch(FIELDS["vocab_size"])
    # Jitted: run op by op, the two models cost hundreds of one-primitive compiles.
    forward = [jax.jit(m.apply, static_argnames=("output_hidden_states", "cache"))
               for m in (unrolled, scanned)]
    outs = [f({"params": params}, ids, mask, output_hidden_states=True) for f in forward]
    close(outs[0].logits, outs[1].logits)
    close(outs[0].hidden_states, outs[1].hidden_states)
    weights = jax.random.normal(jax.random.key(1), outs[0].logits.shape)
    grads = [jax.jit(jax.grad(lambda p, m=m: (m.apply({"params": p}, ids, mask).logits
                                              * weights).sum()))(params)
             for m in (unrolled, scanned)]
    close(grads[0], grads[1])
    # A prompt into a cache, then one token more: logits and the cache's keys and values.
    slots = ids.shape[1] + 2
    cache_mask = np.concatenate([mask, np.zeros((len(ids), 2), mask.dtype)], axis=1)
    firsts = [f({"params": params}, ids, cache_mask, cache=slots) for f in forward]
    close(firsts[0].cache.keys, firsts[1].cache.keys)
    step_mask = cache_mask.copy()
    step_mask[:, ids.shape[1]] = 1
    nexts = [jax.jit(m.apply)({"params": params}, ids[:, -1:], step_mask, cache=first.cache)
             for m, first in zip((unrolled, scanned), firsts)]
    close(nexts[0].logits, nexts[1].logits)
    close(nexts[0].cache.values, nexts[1].cache.values)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_a_quantized_base_runs_scanned(tmp_path, fmt, padded_batch):
    """Quantized kernels stack into the scan as they are stored, and give the unrolled logits."""
    save_hf(HF_CLASSES["llama"][0](**(BASE | dict(hidden_size=64, intermediate_size=128,
                                                  num_attention_heads=4, num_key_value_heads=2))),
            tmp_path)
    unrolled, params, _ = hub.load_pretrained(tmp_path, quantize=fmt)
    scanned, _, _ = hub.load_pretrained(tmp_path, quantize=fmt, scan_layers=True)
    assert scanned.config.scan_layers and any(
        quant.is_quantized(leaf) for leaf in jax.tree_util.tree_leaves(
            params, is_leaf=quant.is_quantized))
    ids, mask = padded_batch(BASE["vocab_size"])
    close(*(m.apply({"params": params}, ids, mask).logits for m in (unrolled, scanned)))


def test_beam_search_with_lora_decodes_the_same_tokens_scanned():
    """KV-cached beam search through LoRA over the scanned blocks: the unrolled tokens."""
    unrolled, scanned, params = models()
    stack = methods.build(tiny_section("qwen2", "lora"), model_family("qwen2"))
    frozen, trainable = stack.split(params, jax.random.key(1))
    trainable = jax.tree_util.tree_map(lambda x: x + 0.2, trainable)
    prompts = [[5, 6, 7, 8], [9, 10]]
    decoded = [generate.beam_search(
        lambda both, *a, m=m, **k: stack.adapt(m.apply)(*both, *a, **k), (frozen, trainable),
        prompts, num_beams=3, max_new_tokens=6, eos_ids=0) for m in (unrolled, scanned)]
    assert decoded[0] == decoded[1] and all(decoded[0])


def _prompts(stack, vocab: int) -> jnp.ndarray:
    """Two rows as the stack feeds them (PreEmbed and PreLayer insert their virtual tokens)."""
    rows = [stack.prepare_prompt(list(range(start, start + 6)), vocab) for start in (5, 20)]
    return jnp.asarray(rows)


# One method per way of reaching the model runs by default: intercept_dense with dropout (LoRA),
# reading W0 in the hook (DoRA), shared buffers (VeRA), blocks that differ (AdapterDrop), the
# prefix hook (PreLayer), gradients through the stacked params (full fine-tuning). `-m slow`
# runs every registered method.
DEFAULT_METHODS = ("lora", "dora", "vera", "adapter_d", "prelayer", "full")


@pytest.mark.parametrize("name", [
    name if name in DEFAULT_METHODS else pytest.param(name, marks=pytest.mark.slow)
    for name in METHODS])
def test_every_method_runs_inside_the_scan(name):
    """Each registered method, its trained values moved off the identity and its dropout on
    where it has one, gives the unrolled model's logits and gradients over the scanned blocks."""
    unrolled, scanned, params = models()
    c = tiny_section("qwen2", name)
    for section in ("lora", "dora", "pissa", "lora_plus", "vera", "adalora"):
        if "dropout" in c[section]:
            c[section].dropout = 0.1
    if name == "loftq":
        c.loftq.targets = model_family("qwen2").lora_targets
    stack = calibrated(methods.build(c, model_family("qwen2")), unrolled.apply, params,
                       FIELDS["vocab_size"])
    frozen, trainable = stack.split(params, jax.random.key(1))
    leaves, tree = jax.tree_util.tree_flatten(trainable)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    trainable = jax.tree_util.tree_unflatten(
        tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    ids = _prompts(stack, FIELDS["vocab_size"])
    weights = jax.random.normal(jax.random.key(3), ids.shape + (FIELDS["vocab_size"],))

    def loss(trainable, model):
        logits = stack.adapt(model.apply)(frozen, trainable, ids,
                                          method_rng=jax.random.key(4)).logits
        return (logits * weights).sum(), logits

    results = [jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(trainable, m)
               for m in (unrolled, scanned)]
    (_, unrolled_logits), unrolled_grads = results[0]
    (_, scanned_logits), scanned_grads = results[1]
    close(unrolled_logits, scanned_logits)
    close(unrolled_grads, scanned_grads)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(scanned_grads))


def _run(tmp_path, data_dir, scan_layers: bool) -> tuple[list[float], dict]:
    """configs/instruct.py's tiny Llama (LoRA on q, k, v, o, dropout 0.05) for three steps:
    (training losses, the exported adapter's tensors)."""
    path = write_jsonl(tmp_path / "alpaca.jsonl", records(16))
    c = instruct_config(path, data_dir, **{
        "data.eval_fraction": 0.25, "data.batch_size": 4, "data.eval_batch_size": 4,
        "data.max_len": 64, "optim.lr": 1e-2, "optim.warmup_steps": 1, "train.max_steps": 3,
        "train.log_every": 1, "train.eval_every": 3, "train.checkpoint_every": 3,
        "model.scan_layers": scan_layers})
    workdir = tmp_path / ("scanned" if scan_layers else "unrolled")
    train(c, workdir)
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if r["split"] in ("train", "eval")]
    return losses, safetensors.numpy.load_file(workdir / "adapter" / "adapter_model.safetensors")


def test_a_scanned_run_trains_the_unrolled_runs_adapters(tmp_path, data_dir):
    """The trainer with model.scan_layers gives the unrolled run's losses and exported
    adapters."""
    (losses, adapters), (scanned_losses, scanned_adapters) = (
        _run(tmp_path, data_dir, s) for s in (False, True))
    assert len(losses) == 4
    np.testing.assert_allclose(scanned_losses, losses, rtol=1e-5)
    assert sorted(scanned_adapters) == sorted(adapters) and len(adapters) == 16
    close([adapters[k] for k in sorted(adapters)],
          [scanned_adapters[k] for k in sorted(adapters)])
    # The steps moved the adapters (B starts at zero).
    assert all(np.abs(v).max() > 0 for k, v in adapters.items() if "lora_B" in k)


@pytest.mark.parametrize("settings", [
    {"targets": (r"layers_[02]/self_attn/q_proj/kernel",)},
    {"targets": ("q_proj/kernel", "v_proj/kernel"), "rank_pattern": {"layers_1/": 2},
     "alpha_pattern": {"layers_2/v_proj": 3.0}},
], ids=["some_blocks", "ranks_by_block"])
def test_blocks_that_compute_differently_run_in_the_scan(settings, padded_batch):
    """Adapters on some blocks only, or ranks and scales that differ by block: each block runs
    its own computation inside the scan, as unrolled."""
    unrolled, scanned, params = models()
    ids, mask = padded_batch(FIELDS["vocab_size"])
    c = tiny_section("qwen2", "lora")
    for field, value in settings.items():
        c.lora[field] = value
    stack = calibrated(methods.build(c, model_family("qwen2")), unrolled.apply, params,
                       FIELDS["vocab_size"])
    frozen, trainable = stack.split(params, jax.random.key(1))
    trainable = jax.tree_util.tree_map(lambda x: x + 0.1, trainable)
    close(*(stack.adapt(m.apply)(frozen, trainable, ids, mask).logits
            for m in (unrolled, scanned)))


def test_what_one_scanned_block_cannot_run_is_refused():
    """Layers with different sliding windows, and a family that does not scan its blocks."""
    with pytest.raises(ValueError, match="different sliding windows"):
        LlamaConfig(num_hidden_layers=2, windows=(4, None), scan_layers=True)
    with pytest.raises(ValueError, match="scan_layers is implemented for llama, mistral, "
                                         "qwen2, not for gpt2"):
        hub.model_from_hf_config(transformers.GPT2Config(n_layer=2, n_embd=8, n_head=2),
                                 scan_layers=True)
    c = tiny_config(**{"model.scan_layers": True})  # a random BERT
    with pytest.raises(ConfigError, match=r"model\.scan_layers = True.*'bert'"):
        check_config(c, device_count=1)
    check_config(tiny_config(), device_count=1)


def test_the_smollm2_configs_scan_their_blocks():
    """The real decoder's configs run its 30 blocks scanned (a third of the compile time)."""
    for name in ("instruct", "e2e"):
        c = load_config(str(REPO_ROOT / f"configs/{name}.py") + ":model=smollm2-135m")
        assert c.model.scan_layers, name
    assert not load_config(str(REPO_ROOT / "configs/instruct.py") + ":model=tiny").model.scan_layers
