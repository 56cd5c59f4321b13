"""Five AdamW steps of lora_jax against PEFT on torch, from the same initial A and B."""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import torch
import transformers

from lora_jax.methods import lora
from lora_jax.interop.hub import load_pretrained
from lora_jax.models.encoder import sequence_classification_loss
from lora_jax.models.gpt2 import lm_loss
from conftest import save_tiny_hf_gpt2
from parity import STEPS, jax_steps, save_tiny_roberta, token_batches, torch_steps


def _copy_peft_adapters(peft_model, modules: list[str]) -> dict:
    """PEFT's lora_A/lora_B (default adapter) as lora_jax's nested adapter tree."""
    named = dict(peft_model.named_modules())
    tree = {}
    for flax_path, torch_name in modules:
        layer = named[torch_name]
        node = tree
        for part in flax_path.split("/"):
            node = node.setdefault(part, {})
        node["lora_a"] = jnp.asarray(layer.lora_A["default"].weight.detach().numpy())
        node["lora_b"] = jnp.asarray(layer.lora_B["default"].weight.detach().numpy())
    return tree


def _assert_adapters_match(trainable, peft_model, modules):
    expected = _copy_peft_adapters(peft_model, modules)
    got = jax.tree_util.tree_map(np.asarray, trainable["lora"])
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(expected)
    jax.tree_util.tree_map(lambda g, e: np.testing.assert_allclose(g, e, rtol=0, atol=1e-5),
                           got, expected)


def test_gpt2_fused_c_attn_matches_peft(tmp_path):
    config = save_tiny_hf_gpt2(tmp_path)
    model, params, _ = load_pretrained(tmp_path)

    base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"],
                                  fan_in_fan_out=True)
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(base, peft_config)
    modules = [(f"h_{i}/attn/c_attn", f"base_model.model.transformer.h.{i}.attn.c_attn")
               for i in range(config.n_layer)]

    spec = lora.LoraSpec(targets=(r"attn/c_attn",), rank=4, alpha=8.0)
    frozen, trainable = lora.split(spec, params, jax.random.key(0))
    trainable = {"lora": _copy_peft_adapters(peft_model, modules), "params": {}}
    apply = lora.adapt(model.apply, spec)

    batches = token_batches(config.vocab_size, STEPS, batch=3, seq=16, seed=0)

    def torch_loss(batch):
        ids, mask = (torch.from_numpy(b) for b in batch)
        labels = ids.masked_fill(mask == 0, -100)
        return peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss

    def loss_fn(frozen, trainable, batch, rng):
        ids, mask = batch
        logits = apply(frozen, trainable, ids, attention_mask=mask, lora_rng=rng).logits
        return lm_loss(logits, ids, mask)

    torch_losses = torch_steps(peft_model, torch_loss, batches)
    jax_losses, trainable = jax_steps(loss_fn, frozen, trainable,
                                       [tuple(map(jnp.asarray, b)) for b in batches])
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=1e-5)
    assert torch_losses[-1] < torch_losses[0]
    _assert_adapters_match(trainable, peft_model, modules)


def test_roberta_query_value_with_classifier_matches_peft(tmp_path):
    config = save_tiny_roberta(tmp_path)
    model, params, _ = load_pretrained(tmp_path, task="classification", num_labels=3)

    base = transformers.RobertaForSequenceClassification.from_pretrained(tmp_path)
    # SEQ_CLS makes PEFT train the classifier head in full (modules_to_save).
    peft_config = peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=8, lora_alpha=16,
                                  lora_dropout=0.0, target_modules=["query", "value"])
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(base, peft_config)
    modules = [(f"roberta/encoder/layer_{i}/attention/self/{m}",
                f"base_model.model.roberta.encoder.layer.{i}.attention.self.{m}")
               for i in range(config.num_hidden_layers) for m in ("query", "value")]

    spec = lora.LoraSpec(targets=(r"/query/kernel", r"/value/kernel"), rank=8, alpha=16.0,
                         also_train=(r"^classifier/",))
    frozen, trainable = lora.split(spec, params, jax.random.key(0))
    trainable = {"lora": _copy_peft_adapters(peft_model, modules), "params": trainable["params"]}
    apply = lora.adapt(model.apply, spec)

    batches = [(ids, mask, np.random.default_rng(i).integers(0, 3, ids.shape[0]))
               for i, (ids, mask) in enumerate(token_batches(config.vocab_size, STEPS, 4, 12, seed=1))]

    def torch_loss(batch):
        ids, mask, labels = (torch.from_numpy(b) for b in batch)
        return peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss

    def loss_fn(frozen, trainable, batch, rng):
        ids, mask, labels = batch
        logits = apply(frozen, trainable, ids, attention_mask=mask, lora_rng=rng).logits
        return sequence_classification_loss(logits, labels, num_labels=3)

    torch_losses = torch_steps(peft_model, torch_loss, batches)
    jax_losses, trainable = jax_steps(loss_fn, frozen, trainable,
                                       [tuple(map(jnp.asarray, b)) for b in batches])
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=1e-5)
    _assert_adapters_match(trainable, peft_model, modules)
    # The fully-trained head also followed PEFT's copy of it.
    head = dict(peft_model.named_parameters())
    np.testing.assert_allclose(
        trainable["params"]["classifier"]["out_proj"]["kernel"],
        head["base_model.model.classifier.modules_to_save.default.out_proj.weight"].detach().numpy().T,
        atol=1e-5)

