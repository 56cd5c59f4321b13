"""Shared by the PEFT parity tests: token batches, and the same AdamW steps in torch and in JAX."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from lora_jax.training import optim

STEPS, LR, WEIGHT_DECAY = 5, 1e-2, 0.01
ADAM_EPS = 1e-8  # torch.optim.AdamW's default, and lora_jax.training.optim.adamw's


def token_batches(vocab: int, n: int, batch: int, seq: int, seed: int):
    """Token ids with right padding (some rows shorter), as numpy."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(3, vocab, (batch, seq))
        lengths = rng.integers(seq // 2, seq + 1, batch)
        lengths[0] = seq
        mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
        out.append((ids * mask + (1 - mask) * 1, mask))  # pad id 1
    return out


def torch_steps(peft_model, loss_of_batch, batches, trainable=None, lr=LR, optimizer=None,
                after_step=None, eps=ADAM_EPS):
    """AdamW steps on `trainable` (default: the model's parameters that require a gradient), or
    steps of a given torch `optimizer`; `after_step(i)` runs after step i's update, before the
    gradients are cleared (PEFT's AdaLoRA allocates ranks there)."""
    if trainable is None:
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
    opt = optimizer or torch.optim.AdamW(trainable, lr=lr, weight_decay=WEIGHT_DECAY, eps=eps)
    peft_model.train()
    losses = []
    for batch in batches:
        loss = loss_of_batch(batch)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step(len(losses))
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def jax_steps(loss_fn, frozen, trainable, batches, lr=LR, tx=None, eps=ADAM_EPS):
    """The same steps in JAX: AdamW at `lr` (and `eps`), or the optax transformation `tx`."""
    tx = tx or optim.adamw(lr, weight_decay=WEIGHT_DECAY, eps=eps)
    opt_state = tx.init(trainable)
    step = optim.make_train_step(loss_fn, tx)
    losses = []
    for i, batch in enumerate(batches):
        trainable, opt_state, loss, _ = step(frozen, trainable, opt_state, batch,
                                             jax.random.key(i))
        losses.append(float(loss))
    return losses, trainable


def save_tiny_roberta(directory):
    """A random 2-layer RoBERTa classifier (width 32, 3 labels, no dropout) saved with
    transformers, the encoder of the parity tests; returns its config."""
    import transformers

    config = transformers.RobertaConfig(
        vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=3, pad_token_id=1)
    torch.manual_seed(0)
    transformers.RobertaForSequenceClassification(config).save_pretrained(directory)
    return config


def transformers_adamw(lr: float = LR, b1: float = 0.9, b2: float = 0.999,
                       eps: float = 1e-6) -> optax.GradientTransformation:
    """transformers' AdamW form without weight decay, which PEFT's LoRA-FA optimizer takes: eps
    is added to the square root of the uncorrected second moment, and the step size carries
    both bias corrections (optax adds eps to the corrected one, which differs where a gradient
    is near eps)."""

    def init(params):
        def zeros():  # two trees of their own: the train step donates the state's buffers
            return jax.tree_util.tree_map(jnp.zeros_like, params)

        return (jnp.zeros([], jnp.int32), zeros(), zeros())

    def update(grads, state, params=None):
        count, mu, nu = state
        count = count + 1
        mu = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, mu, grads)
        nu = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, nu, grads)
        t = count.astype(jnp.float32)
        step = lr * jnp.sqrt(1 - b2**t) / (1 - b1**t)
        updates = jax.tree_util.tree_map(lambda m, v: -step * m / (jnp.sqrt(v) + eps), mu, nu)
        return updates, (count, mu, nu)

    return optax.GradientTransformation(init, update)
