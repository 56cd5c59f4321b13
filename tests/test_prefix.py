"""PreEmbed and PreLayer: PEFT prompt-tuning parity, their layout, packing and the KV cache."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

from lora_jax import generate, methods
from lora_jax.config import base_config
from lora_jax.data import batching
from lora_jax.data.packing import pack_examples, packed_batches
from lora_jax import exports
from lora_jax.interop.hub import load_pretrained
from lora_jax.methods import calibration
from lora_jax.methods.base import SettingError
from lora_jax.models import family as model_family
from lora_jax.models.gpt2 import lm_loss
from conftest import save_tiny_hf_gpt2
from test_packing import BUCKETS, EOS, e2e_rows, gpt2, per_example_losses, tokenizer  # noqa: F401
from parity import STEPS, jax_steps, token_batches, torch_steps

GPT2 = model_family("gpt2")


def stack_of(name: str, prefix: int, infix: int = 0, start: str = "embeddings"
             ) -> methods.MethodStack:
    """PreEmbed or PreLayer; PreLayer from embeddings unless `start` says otherwise (where the
    start does not matter: an 'activations' start needs a calibration batch first)."""
    c = base_config().method
    c.use, c.also_train = (name,), ()
    c[name].prefix, c[name].infix = prefix, infix
    if name == "prelayer":
        c.prelayer.start = start
    return methods.build(c, GPT2)


def calibration_data(model, params, rows):
    """`methods.calibration.Batches` of one batch: `rows` as prepared (ids, attention, loss
    masks), padded right."""
    def forward(params, batch):
        return model.apply({"params": params}, batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits

    def hidden_states(params, batch):
        return model.apply({"params": params}, batch["input_ids"],
                           attention_mask=batch["attention_mask"],
                           output_hidden_states=True).hidden_states

    ids, attention, loss = rows
    batch = {"input_ids": ids, "attention_mask": attention, "loss_mask": loss}
    return calibration.Batches(forward, params, [batch], lambda logits, batch: 0.0, hidden_states)


def one_row(stack, example: dict, vocab: int, padding: int = 0):
    """(ids, attention, loss mask) of `example` as `stack` prepares it, a row of `padding` pad
    tokens after it and a padding row below."""
    out = stack.prepare_example(example, 512, vocab)
    width = len(out["input_ids"]) + padding
    ids, loss, attention = (np.zeros((2, width), np.int64) for _ in range(3))
    ids[0, :len(out["input_ids"])] = out["input_ids"]
    loss[0, :len(out["loss_mask"])] = out["loss_mask"]
    attention[0, :len(out["input_ids"])] = 1
    return ids, attention, loss


def prepared_batch(stack, rows, vocab: int, pad_id: int):
    """Right-padded batch of LM rows (all tokens targets, as HF's labels=ids) after `stack`."""
    examples = [stack.prepare_example({"input_ids": list(r), "loss_mask": [1] * len(r)}, 512,
                                      vocab) for r in rows]
    width = max(len(e["input_ids"]) for e in examples)
    ids = np.full((len(rows), width), pad_id)
    loss = np.zeros((len(rows), width), np.int64)
    for i, e in enumerate(examples):
        ids[i, :len(e["input_ids"])] = e["input_ids"]
        loss[i, :len(e["loss_mask"])] = e["loss_mask"]
    attention = (np.arange(width)[None, :] < np.array([len(e["input_ids"]) for e in examples])[:, None])
    return ids, attention.astype(np.int64), loss


def test_prefix_only_preembed_trains_as_peft_prompt_tuning(tmp_path):
    config = save_tiny_hf_gpt2(tmp_path, n_positions=40)
    model, params, _ = load_pretrained(tmp_path)
    stack = stack_of("preembed", prefix=4)
    frozen, trainable = stack.split(params, jax.random.key(0))
    assert trainable["preembed"]["embeddings"].shape == (4, 32)

    base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    peft_model = peft.get_peft_model(base, peft.PromptTuningConfig(
        task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=4))
    embedding = peft_model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        embedding.copy_(torch.tensor(np.asarray(trainable["preembed"]["embeddings"])))

    raw = token_batches(config.vocab_size, STEPS, batch=3, seq=16, seed=0)
    ours = [prepared_batch(stack, [ids[i, :m.sum()] for i, m in enumerate(mask)], 97, 1)
            for ids, mask in raw]
    assert all((ids[:, :4] == np.arange(97, 101)).all() for ids, _, _ in ours)  # the prefix
    apply = stack.adapt(model.apply)

    def torch_loss(batch):
        ids, mask = (torch.from_numpy(b) for b in batch)
        return peft_model(input_ids=ids, attention_mask=mask,
                          labels=ids.masked_fill(mask == 0, -100)).loss

    def loss_fn(frozen, trainable, batch, rng):
        ids, attention, loss_mask = batch
        return lm_loss(apply(frozen, trainable, ids, attention_mask=attention).logits, ids,
                       loss_mask)

    start = np.asarray(trainable["preembed"]["embeddings"])  # the step donates `trainable`
    torch_losses = torch_steps(peft_model, torch_loss, raw, [embedding])
    jax_losses, trained = jax_steps(loss_fn, frozen, trainable,
                                     [tuple(map(jnp.asarray, b)) for b in ours])
    np.testing.assert_allclose(jax_losses, torch_losses, rtol=1e-5)
    np.testing.assert_allclose(trained["preembed"]["embeddings"], embedding.detach().numpy(),
                               atol=1e-5)
    assert np.abs(trained["preembed"]["embeddings"] - start).max() > 1e-3  # it moved


def test_prefix_and_infix_go_around_the_prompt_with_no_loss_on_them():
    stack = stack_of("preembed", prefix=2, infix=3)
    example = {"input_ids": [5, 6, 7, 8, 9], "loss_mask": [0, 0, 1, 1, 1]}  # prompt 5, 6
    out = stack.prepare_example(example, 512, 100)
    assert out["input_ids"] == [100, 101, 5, 6, 102, 103, 104, 7, 8, 9]
    assert out["loss_mask"] == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]
    assert stack.prepare_example(example, 6, 100)["input_ids"] == [100, 101, 5, 6, 102, 103]
    assert stack.prepare_prompt([5, 6], 100) == [100, 101, 5, 6, 102, 103, 104]
    with pytest.raises(ValueError, match="language-model examples"):
        stack.prepare_example({"input_ids": [1, 2], "label": 0}, 512, 100)


def test_prelayer_with_preembeds_own_activations_is_preembed(gpt2):
    """PreLayer's trained vectors are each block's input at the virtual positions: set to what
    PreEmbed's model computes there, the two are one function. With any other vectors they are
    not (the check can fail)."""
    model, params, _ = gpt2
    vocab = GPT2.vocab_size(params)
    embed, layer = stack_of("preembed", prefix=3, infix=2), stack_of("prelayer", prefix=3, infix=2)
    frozen, trainable = embed.split(params, jax.random.key(0))
    _, layered = layer.split(params, jax.random.key(0))
    assert layered["prelayer"]["activations"].shape == (2, 5, 32)  # L x (l_p + l_i) x d
    example = {"input_ids": [11, 12, 13, 14, 15, 16], "loss_mask": [0, 0, 1, 1, 1, 1]}
    ids = jnp.asarray([embed.prepare_example(example, 512, vocab)["input_ids"]])
    out = embed.adapt(model.apply)(frozen, trainable, ids, output_hidden_states=True)
    virtual = np.flatnonzero(np.asarray(ids[0]) >= vocab)
    inputs = [out.hidden_states[i][0, virtual] for i in range(2)]  # block 0 and block 1 inputs
    same = {"prelayer": {"activations": jnp.stack(inputs)}, "params": {}}
    got = layer.adapt(model.apply)(frozen, same, ids).logits
    np.testing.assert_allclose(got, out.logits, atol=1e-5)
    noise = jax.random.normal(jax.random.key(1), (2, 5, 32))  # (not a constant: LN removes it)
    other = {"prelayer": {"activations": jnp.stack(inputs) + noise}, "params": {}}
    assert float(jnp.abs(layer.adapt(model.apply)(frozen, other, ids).logits
                         - out.logits).max()) > 1e-2


def test_prelayers_activation_start_is_the_model_reading_the_rows_first_tokens_twice(gpt2,
                                                                                   tmp_path):
    """PreLayer's default start: each block's input at the run's first row's first l_p tokens.
    With it, the model over [prefix] + row computes exactly what the base model computes over
    row[:l_p] + row; the infix's vectors are the block inputs at the prompt's last l_i tokens."""
    model, params, _ = gpt2
    vocab = GPT2.vocab_size(params)
    row = [11, 12, 13, 14, 15, 16, 17]
    example = {"input_ids": row, "loss_mask": [0, 0, 0, 0, 1, 1, 1]}  # a prompt of 4 tokens
    for prefix, infix in ((3, 0), (1, 2)):
        stack = stack_of("prelayer", prefix=prefix, infix=infix, start="activations")
        assert stack.calibration() == 1
        # The start reads the prepared batch's first row (virtual tokens out, padding out).
        stack = stack.calibrated(calibration_data(model, params,
                                                  one_row(stack, example, vocab, padding=3)))
        assert stack.calibration() == 0
        frozen, trainable = stack.split(params, jax.random.key(0))
        start = np.asarray(trainable["prelayer"]["activations"])
        assert start.shape == (2, prefix + infix, 32)
        states = model.apply({"params": params}, jnp.asarray([row]),
                             output_hidden_states=True).hidden_states
        for block in range(2):
            np.testing.assert_allclose(start[block, :prefix], states[block][0, :prefix],
                                       atol=1e-6)
            np.testing.assert_allclose(start[block, prefix:], states[block][0, 4 - infix:4],
                                       atol=1e-6)
    ids = jnp.asarray([stack_of("prelayer", prefix=3).prepare_example(example, 512, vocab)
                       ["input_ids"]])
    stack = stack_of("prelayer", prefix=3, start="activations")
    stack = stack.calibrated(calibration_data(model, params, one_row(stack, example, vocab)))
    frozen, trainable = stack.split(params, jax.random.key(0))
    ours = stack.adapt(model.apply)(frozen, trainable, ids).logits
    twice = model.apply({"params": params}, jnp.asarray([row[:3] + row])).logits
    np.testing.assert_allclose(ours, twice, atol=1e-5)
    # Exported and loaded back (the loader checks tensors against the method's shapes, with no
    # calibration at hand), the start gives the same logits.
    section = base_config().method
    section.use, section.also_train = ("prelayer",), ()
    section.prelayer.prefix, section.prelayer.infix = 3, 0  # start: 'activations', the default
    exported = exports.save(tmp_path / "prelayer", stack, section, trainable, model_type="gpt2",
                            task=None)
    loaded_stack, loaded = exports.load(exported, params, GPT2, None)
    np.testing.assert_allclose(loaded_stack.adapt(model.apply)(frozen, loaded, ids).logits,
                               ours, atol=1e-6)
    # From embeddings the same row gives other logits (the check can fail).
    embedded = stack_of("prelayer", prefix=3)
    frozen, from_embeddings = embedded.split(params, jax.random.key(0))
    assert float(jnp.abs(embedded.adapt(model.apply)(frozen, from_embeddings, ids).logits
                         - twice).max()) > 1e-2


def test_prelayers_activation_start_refuses_what_it_cannot_start_from(gpt2):
    model, params, _ = gpt2
    vocab = GPT2.vocab_size(params)
    stack = stack_of("prelayer", prefix=3, start="activations")
    with pytest.raises(SettingError, match=r"start 'activations' is the base model's block "
                                           r"inputs at real tokens: calibrate it"):
        stack.split(params, jax.random.key(0))
    # Shapes alone (the config checks before any batch is read) need no calibration.
    _, shapes = jax.eval_shape(lambda p: stack.split(p, jax.random.key(0)), params)
    assert shapes["prelayer"]["activations"].shape == (2, 3, 32)
    short = one_row(stack, {"input_ids": [11, 12, 13, 14], "loss_mask": [0, 1, 1, 1]}, vocab)
    with pytest.raises(SettingError, match=r"first training row has a prompt of 1 tokens"):
        stack.calibrated(calibration_data(model, params, short))
    wide = stack.with_calibration({"prelayer/activations": np.zeros((2, 3, 16), np.float32)})
    with pytest.raises(SettingError, match=r"activations of shape \(2, 3, 16\) for a model "
                                           r"that needs \(2, 3, 32\)"):
        wide.split(params, jax.random.key(0))
    c = base_config().method
    c.use, c.also_train = ("prelayer",), ()
    c.prelayer.start = "tokens"
    with pytest.raises(ValueError, match=r"start"):
        methods.build(c, GPT2)


@pytest.mark.parametrize("name", ["preembed", "prelayer"])
def test_packed_rows_give_each_prepared_example_its_unpacked_loss(gpt2, e2e_rows, name):
    model, params, _ = gpt2
    stack = stack_of(name, prefix=3, infix=2)
    frozen, trainable = stack.split(params, jax.random.key(0))
    vocab = GPT2.vocab_size(params)
    rows = [stack.prepare_example(r, 512, vocab) for r in e2e_rows(8)]
    packed = pack_examples(rows, 256)
    assert max(map(len, packed)) >= 2
    [packed_batch] = packed_batches(rows, packed, len(packed), seed=0, epoch=0, pad_id=EOS,
                                    buckets=BUCKETS)
    [alone] = batching.epoch_batches(rows, len(rows), seed=0, epoch=0, shuffle=False, pad_id=EOS,
                                     buckets=BUCKETS)
    apply = stack.adapt(model.apply)

    def logits(batch):
        keys = ("attention_mask", "segment_ids", "position_ids")
        return apply(frozen, trainable, batch["input_ids"],
                     **{k: batch[k] for k in keys if k in batch}).logits

    expected, got = per_example_losses(alone, logits(alone)), per_example_losses(
        packed_batch, logits(packed_batch))
    assert got.keys() == expected.keys()
    for key, (total, weight) in expected.items():
        assert got[key][1] == weight > 0
        assert got[key][0] == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize("name", ["preembed", "prelayer"])
def test_kv_cached_greedy_decoding_equals_recomputing_the_whole_row(gpt2, name):
    model, params, _ = gpt2
    stack = stack_of(name, prefix=2, infix=2)
    frozen, trainable = stack.split(params, jax.random.key(0))
    vocab = GPT2.vocab_size(params)
    prompts = [stack.prepare_prompt(p, vocab) for p in ([5, 6, 7], [8, 9, 10, 11, 12])]
    new_tokens = 3
    adapted = stack.adapt(model.apply)
    apply_fn = lambda p, *a, **k: adapted(p[0], p[1], *a, **k)  # noqa: E731
    got = generate.greedy_search(apply_fn, (frozen, trainable), prompts, max_new_tokens=new_tokens,
                                 eos_ids=(vocab + 100,), pad_id=0)
    for prompt, continuation in zip(prompts, got):
        row = list(prompt)
        for _ in range(new_tokens):
            logits = adapted(frozen, trainable, jnp.asarray([row])).logits
            row.append(int(jnp.argmax(logits[0, -1])))
        assert continuation == row[len(prompt):]


def test_prefix_only_preembed_exports_as_peft_prompt_tuning_and_loads_back(tmp_path):
    save_tiny_hf_gpt2(tmp_path / "base", n_positions=40)
    model, params, _ = load_pretrained(tmp_path / "base")
    stack = stack_of("preembed", prefix=3)
    frozen, trainable = stack.split(params, jax.random.key(0))
    trainable["preembed"]["embeddings"] += jax.random.normal(jax.random.key(1), (3, 32))
    out = exports.save(tmp_path / "adapter", stack, {"use": ("preembed",)}, trainable,
                       model_type="gpt2", task=None)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"

    ids = np.array([[5, 6, 7, 8, 9, 10]])
    prepared = jnp.asarray([stack.prepare_prompt(ids[0].tolist(), 97)])
    ours = stack.adapt(model.apply)(frozen, trainable, prepared).logits
    peft_model = peft.PeftModel.from_pretrained(
        transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base"), out).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-5)

    loaded_stack, loaded = exports.load(out, params, GPT2, None)
    again = loaded_stack.adapt(model.apply)(frozen, loaded, prepared).logits
    np.testing.assert_allclose(again, ours, atol=1e-6)
    # With an infix (or PreLayer) PEFT has no such method: lora_jax's own format.
    infix = stack_of("preembed", prefix=2, infix=1)
    _, with_infix = infix.split(params, jax.random.key(0))
    exports.save(tmp_path / "infix", infix, {"use": ("preembed",)}, with_infix,
                 model_type="gpt2", task=None)
    assert (tmp_path / "infix" / exports.CONFIG_NAME).is_file()


def test_lora_and_preembed_compose_as_in_appendix_e(gpt2):
    model, params, _ = gpt2
    c = base_config().method
    c.use, c.also_train = ("lora", "preembed"), ()
    c.lora.targets, c.lora.split_outputs = GPT2.lora_targets, dict(GPT2.lora_split_outputs)
    c.preembed.prefix, c.preembed.infix = 2, 1
    both = methods.build(c, GPT2)
    frozen, trainable = both.split(params, jax.random.key(0))
    assert set(trainable) == {"params", "lora", "preembed"}
    assert methods.count_params(trainable) == 2 * (2 * 2) * 32 * 8 + 32 * 3  # 2 L d r + d (l_p + l_i)
    vocab = GPT2.vocab_size(params)
    ids = jnp.asarray([both.prepare_example({"input_ids": [5, 6, 7, 8], "loss_mask": [0, 0, 1, 1]},
                                            512, vocab)["input_ids"]])
    assert ids.shape == (1, 7)
    # At step 0 LoRA is the identity (B = 0): the pair computes what PreEmbed alone does.
    alone = stack_of("preembed", prefix=2, infix=1)
    only = {"params": {}, "preembed": trainable["preembed"]}
    np.testing.assert_allclose(both.adapt(model.apply)(frozen, trainable, ids).logits,
                               alone.adapt(model.apply)(frozen, only, ids).logits, atol=1e-6)
    moved = jax.tree_util.tree_map(lambda x: x + 0.1, trainable["lora"])
    changed = both.adapt(model.apply)(frozen, {**trainable, "lora": moved}, ids).logits
    assert float(jnp.abs(changed - alone.adapt(model.apply)(frozen, only, ids).logits).max()) > 1e-3
