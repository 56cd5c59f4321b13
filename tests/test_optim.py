"""Adapter-only optimization: frozen leaves never move, state exists only for adapters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax.training import optim
from lora_jax.methods import lora
from lora_jax.methods.lora import LoraSpec


class TwoLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="out")(nn.tanh(nn.Dense(32, name="hidden")(x)))


def _problem():
    model = TwoLayer()
    x = jax.random.normal(jax.random.key(0), (8, 12))
    y = jax.random.normal(jax.random.key(1), (8, 4))
    params = model.init(jax.random.key(2), x)["params"]
    spec = LoraSpec(targets=("hidden", "out"), rank=4, alpha=8.0, dropout=0.1)
    frozen, trainable = lora.split(spec, params, jax.random.key(3))
    apply = lora.adapt(model.apply, spec)

    def loss_fn(frozen, trainable, batch, rng):
        pred = apply(frozen, trainable, batch["x"], lora_rng=rng)
        return jnp.mean((pred - batch["y"]) ** 2)

    return frozen, trainable, loss_fn, {"x": x, "y": y}


def _run(steps, tx):
    frozen, trainable, loss_fn, batch = _problem()
    frozen_before = jax.tree_util.tree_map(np.array, frozen)
    trainable_before = jax.tree_util.tree_map(np.array, trainable)
    opt_state = tx.init(trainable)
    step = optim.make_train_step(loss_fn, tx)
    losses = []
    for i in range(steps):
        trainable, opt_state, loss, _ = step(frozen, trainable, opt_state, batch,
                                             jax.random.key(100 + i))
        losses.append(float(loss))
    return frozen_before, frozen, trainable_before, trainable, opt_state, losses


def test_frozen_leaves_bit_identical_after_ten_steps():
    tx = optim.adamw(1e-2, weight_decay=0.1, clip_norm=1.0)
    frozen_before, frozen, trainable_before, trainable, _, losses = _run(10, tx)
    jax.tree_util.tree_map(np.testing.assert_array_equal, frozen, frozen_before)
    moved = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != b)),
                                   trainable, trainable_before)
    assert all(jax.tree_util.tree_leaves(moved)), "every adapter leaf should have been updated"
    assert losses[-1] < losses[0]


def test_optimizer_state_is_twice_the_adapters_plus_scalars():
    tx = optim.adamw(1e-2, weight_decay=0.1)
    _, _, _, trainable, opt_state, _ = _run(1, tx)
    leaves = jax.tree_util.tree_leaves(opt_state)
    scalars = [x for x in leaves if np.ndim(x) == 0]
    assert 0 < len(scalars) <= 2  # step counters
    assert lora.count_params(opt_state) == 2 * lora.count_params(trainable) + len(scalars)


def test_any_optax_transform_works():
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.05, momentum=0.9))
    frozen_before, frozen, _, _, opt_state, losses = _run(5, tx)
    jax.tree_util.tree_map(np.testing.assert_array_equal, frozen, frozen_before)
    assert losses[-1] < losses[0]


def test_bf16_frozen_weights_with_fp32_adapters_and_state(tmp_path):
    """W0 held and computed in bf16; adapters, head and AdamW state stay float32."""
    import transformers

    from lora_jax.interop.hub import load_pretrained
    from lora_jax.models import sequence_classification_loss

    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=16, num_labels=2)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path)
    ids = jax.random.randint(jax.random.key(0), (4, 10), 1, 64)
    labels = jnp.array([0, 1, 1, 0])
    spec = LoraSpec(targets=("query", "value"), rank=4, also_train=("^classifier/",))
    losses = {}
    for name, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        model, params, _ = load_pretrained(tmp_path, task="classification", dtype=dtype,
                                           param_dtype=dtype)
        frozen, trainable = lora.split(spec, params, jax.random.key(1))
        apply = lora.adapt(model.apply, spec)

        def loss_fn(frozen, trainable, batch, rng):
            logits = apply(frozen, trainable, batch, lora_rng=rng).logits
            return sequence_classification_loss(logits.astype(jnp.float32), labels, 2)

        tx = optim.adamw(1e-2)
        opt_state = tx.init(trainable)
        step = optim.make_train_step(loss_fn, tx)
        for i in range(3):
            trainable, opt_state, loss, _ = step(frozen, trainable, opt_state, ids,
                                                 jax.random.key(i))
        losses[name] = float(loss)
        assert {x.dtype for x in jax.tree_util.tree_leaves(frozen)} == {jnp.dtype(dtype)}
        floats = [x for x in jax.tree_util.tree_leaves((trainable, opt_state))
                  if jnp.issubdtype(x.dtype, jnp.floating)]
        assert {x.dtype for x in floats} == {jnp.dtype(jnp.float32)}
    # bf16 rounds weights and activations to 8 mantissa bits (~0.4% each): a loose match.
    assert abs(losses["bf16"] - losses["fp32"]) < 0.05 * abs(losses["fp32"])


def test_gradient_accumulation_equals_the_whole_batch():
    """Two micro-batches of unequal weight give the update of one batch (token-weighted)."""
    frozen, trainable, _, batch = _problem()
    model_apply = lora.adapt(TwoLayer().apply, LoraSpec(targets=("hidden", "out"), rank=4,
                                                        alpha=8.0))
    weights = jnp.array([1, 1, 1, 0, 1, 0, 0, 1], jnp.float32)  # e.g. padding rows

    def loss_sum(frozen, trainable, b, rng):
        err = jnp.sum((model_apply(frozen, trainable, b["x"]) - b["y"]) ** 2, axis=-1)
        return jnp.sum(err * b["w"]), jnp.sum(b["w"])

    full = {**batch, "w": weights}
    tx = optim.adamw(1e-2)
    step = optim.make_train_step(loss_sum, tx, accumulate=True, jit=False)
    one = step(frozen, trainable, tx.init(trainable),
               jax.tree_util.tree_map(lambda x: x[None], full), jax.random.key(0))
    two = step(frozen, trainable, tx.init(trainable),
               jax.tree_util.tree_map(lambda x: x.reshape(2, 4, *x.shape[1:]), full),
               jax.random.key(0))
    np.testing.assert_allclose(one[2], two[2], rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), one[0], two[0])
