"""LoRA on the Llama family against PEFT on torch: adapters exported to PEFT and PEFT adapters
loaded give PEFT's logits; five AdamW steps equal PEFT's (tiny Llama and tiny Qwen2)."""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

from lora_jax.interop.hub import load_pretrained
from lora_jax.methods.lora_peft import export_peft, load_peft
from lora_jax.methods import lora
from lora_jax.models import lm_loss
from parity import STEPS, jax_steps, token_batches, torch_steps
from test_llama import BASE, HF_CLASSES, save_hf

ATOL = 1e-4
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
MODELS = {"llama": dict(), "qwen2": dict(tie_word_embeddings=True)}


@pytest.fixture(scope="module", params=list(MODELS))
def base_dir(request, tmp_path_factory):
    """(model_type, a tiny random checkpoint directory): GQA 4:2, Qwen2 with q/k/v biases."""
    model_type = request.param
    config = HF_CLASSES[model_type][0](**(BASE | MODELS[model_type]))
    path = tmp_path_factory.mktemp(model_type)
    save_hf(config, path)
    return model_type, path


def _torch_model(model_type, path):
    return HF_CLASSES[model_type][1].from_pretrained(path).eval()


def _logits(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids),
                     attention_mask=torch.from_numpy(mask)).logits.numpy()


def test_export_matches_peft(base_dir, tmp_path, padded_batch):
    """The seeds' setting (q, k, v, o) plus the MLP at another rank, exported, loaded by PEFT
    into the torch model of the same directory."""
    model_type, path = base_dir
    spec = lora.LoraSpec(targets=tuple(ATTENTION + MLP), rank=8, alpha=32.0,
                         rank_pattern={"mlp/": 4})
    model, params, _ = load_pretrained(path)
    frozen, trainable = lora.split(spec, params, jax.random.key(0))
    leaves, treedef = jax.tree_util.tree_flatten(trainable)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    trainable = treedef.unflatten([x + 0.1 * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])
    ids, mask = padded_batch(BASE["vocab_size"])
    ours = np.asarray(lora.adapt(model.apply, spec)(frozen, trainable, ids, mask).logits)
    base = np.asarray(model.apply({"params": params}, ids, mask).logits)
    assert np.abs(ours - base)[mask == 1].max() > 100 * ATOL  # the adapters matter

    out = export_peft(tmp_path / "adapter", spec, trainable, model_type=model_type, task=None)
    peft_model = peft.PeftModel.from_pretrained(_torch_model(model_type, path), out).eval()
    modules = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
               if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert modules == {f"model.layers.{i}.{part}.{name}" for i in range(2)
                       for part, names in (("self_attn", ATTENTION), ("mlp", MLP))
                       for name in names}
    theirs = _logits(peft_model, ids, mask)
    np.testing.assert_allclose(ours[mask == 1], theirs[mask == 1], rtol=0, atol=ATOL)


def test_load_peft_matches_peft(base_dir, tmp_path, padded_batch):
    model_type, path = base_dir
    config = peft.LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=ATTENTION,
                             rank_pattern={"o_proj": 2}, task_type="CAUSAL_LM")
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(_torch_model(model_type, path), config)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # B is zero at init: give the adapters values
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(tmp_path / "adapter")
    ids, mask = padded_batch(BASE["vocab_size"])
    theirs = _logits(peft_model.eval(), ids, mask)

    model, params, _ = load_pretrained(path)
    spec, trainable = load_peft(tmp_path / "adapter", params, model_type=model_type)
    assert spec.rank_for("model/layers_1/self_attn/o_proj/kernel") == 2
    ours = lora.adapt(model.apply, spec)(params, trainable, ids, mask).logits
    base = model.apply({"params": params}, ids, mask).logits
    assert np.abs(np.asarray(ours - base))[mask == 1].max() > 100 * ATOL
    np.testing.assert_allclose(np.asarray(ours)[mask == 1], theirs[mask == 1], rtol=0, atol=ATOL)


def test_five_adamw_steps_match_peft(base_dir):
    """From PEFT's own initial A (B = 0), the same 5 AdamW steps: losses and adapters 1e-5."""
    model_type, path = base_dir
    model, params, _ = load_pretrained(path)
    peft_model = peft.get_peft_model(
        _torch_model(model_type, path),
        peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ATTENTION + MLP))
    layers = [(f"model/layers_{i}/{part}/{name}", f"base_model.model.model.layers.{i}.{part}."
               f"{name}") for i in range(2) for part, names in (("self_attn", ATTENTION),
                                                                 ("mlp", MLP)) for name in names]
    named = dict(peft_model.named_modules())

    def peft_adapters():
        tree = {}
        for flax_path, torch_name in layers:
            node = tree
            for part in flax_path.split("/"):
                node = node.setdefault(part, {})
            node["lora_a"] = named[torch_name].lora_A["default"].weight.detach().numpy().copy()
            node["lora_b"] = named[torch_name].lora_B["default"].weight.detach().numpy().copy()
        return tree

    spec = lora.LoraSpec(targets=tuple(ATTENTION + MLP), rank=4, alpha=8.0)
    frozen, _ = lora.split(spec, params, jax.random.key(0))
    trainable = {"lora": jax.tree_util.tree_map(jnp.asarray, peft_adapters()), "params": {}}
    apply = lora.adapt(model.apply, spec)
    batches = token_batches(BASE["vocab_size"], STEPS, batch=3, seq=16, seed=0)

    def torch_loss(batch):
        ids, mask = (torch.from_numpy(b) for b in batch)
        return peft_model(input_ids=ids, attention_mask=mask,
                          labels=ids.masked_fill(mask == 0, -100)).loss

    def loss_fn(frozen, trainable, batch, rng):
        ids, mask = batch
        return lm_loss(apply(frozen, trainable, ids, mask, lora_rng=rng).logits, ids, mask)

    torch_losses = torch_steps(peft_model, torch_loss, batches)
    jax_losses, trainable = jax_steps(loss_fn, frozen, trainable,
                                      [tuple(map(jnp.asarray, b)) for b in batches])
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=1e-5)
    assert torch_losses[-1] < torch_losses[0]
    jax.tree_util.tree_map(lambda g, e: np.testing.assert_allclose(g, e, rtol=0, atol=1e-5),
                           jax.tree_util.tree_map(np.asarray, trainable["lora"]), peft_adapters())
