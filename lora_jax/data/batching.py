"""Tokenized rows -> fixed-size, length-bucketed, padded numpy batches.

    rows = encode_glue(read_glue("sst2", "train"), tokenizer, max_len=128)
    batches = epoch_batches(rows, 16, seed=0, epoch=3, pad_id=tokenizer.pad_token_id)
    batches[i]["input_ids"].shape  # (16, L), L in `buckets`

A batch is padded only to the smallest bucket that holds its longest row, and rows of similar
length are batched together, so short sentences do not pay for 512 tokens and only a few
shapes ever compile. `epoch_batches` is a pure function of its inputs: a trainer resumes
mid-epoch by rebuilding the epoch's list and indexing into it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from lora_jax.data.glue import Example

BUCKETS = (16, 32, 64, 128, 256, 512)
CHUNK_BATCHES = 100  # rows are length-sorted within chunks of this many batches


def encode_glue(examples: Sequence[Example], tokenizer, max_len: int) -> list[dict]:
    """Tokenize GLUE examples, pairs as `tokenizer(text_a, text_b, truncation=True)`.

    Args:
      examples: from `read_glue`; all single sentences or all pairs.
      tokenizer: a Hugging Face tokenizer (its special tokens are added).
      max_len: the longest row in tokens; pairs are cut longest-first.

    Returns:
      [{'input_ids': list[int], 'token_type_ids': list[int] (if the tokenizer makes them),
        'label': int | float}, ...], one per example.

    Raises:
      ValueError: the examples mix single sentences and pairs.
    """
    if not examples:
        return []
    pairs = {e.text_b is not None for e in examples}
    if len(pairs) > 1:
        raise ValueError("examples mix single sentences and sentence pairs; encode them apart")
    texts = [[e.text_a for e in examples]]
    if pairs == {True}:
        texts.append([e.text_b for e in examples])
    enc = tokenizer(*texts, truncation=True, max_length=max_len)
    keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
    return [{**{k: enc[k][i] for k in keys}, "label": e.label} for i, e in enumerate(examples)]


def steps_per_epoch(num_rows: int, batch_size: int, *, drop_remainder: bool = True) -> int:
    """len(epoch_batches(...)) for `num_rows` rows, without building the batches."""
    return num_rows // batch_size if drop_remainder else -(-num_rows // batch_size)


def bucket_length(length: int, buckets: Sequence[int] = BUCKETS) -> int:
    """The smallest bucket >= length.

    Raises:
      ValueError: `length` exceeds the largest bucket.
    """
    for bucket in buckets:
        if bucket >= length:
            return bucket
    raise ValueError(f"a row of {length} tokens exceeds the largest bucket {buckets[-1]}; "
                     f"encode with max_len <= {buckets[-1]} or add a bucket")


def batch_indices(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_remainder: bool = True,
) -> list[np.ndarray]:
    """Which rows form each batch of one epoch (the order behind `epoch_batches`).

    With shuffle: permute the rows (seeded by (seed, epoch)), drop the remainder if asked, sort
    by length within chunks of `CHUNK_BATCHES` batches (stable, so ties keep the permuted
    order), cut into batches, and permute the batches. Without: consecutive rows in order.

    Returns:
      Arrays of row indices, each of length `batch_size` except possibly the last when
      `drop_remainder` is False.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(lengths)
    kept = n - n % batch_size if drop_remainder else n
    if not shuffle:
        order = np.arange(kept)
        return [order[i : i + batch_size] for i in range(0, kept, batch_size)]

    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)[:kept]
    lengths = np.asarray(lengths)
    chunk = CHUNK_BATCHES * batch_size
    batches = []
    for start in range(0, kept, chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def epoch_batches(
    encoded: Sequence[Mapping],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    pad_id: int,
    buckets: Sequence[int] = BUCKETS,
    drop_remainder: bool = True,
) -> list[dict[str, np.ndarray]]:
    """One epoch of padded batches, a pure function of its arguments.

    Args:
      encoded: rows with 'input_ids' and optionally 'token_type_ids', 'loss_mask' (LM data),
        'label' (from `encode_glue` or `lora_jax.data.e2e.encode_e2e`).
      batch_size: rows per batch, always exactly (see drop_remainder).
      seed, epoch: fix the shuffle; the same pair gives the same list.
      shuffle: False keeps the rows in order (evaluation).
      pad_id: the token id that fills padded positions (masked out by attention_mask).
      buckets: allowed sequence lengths, ascending.
      drop_remainder: True (training) drops the rows that do not fill a last batch, different
        ones each epoch when shuffled. False (evaluation) keeps every row: the last batch is
        filled with dummy rows and every batch carries 'example_mask'.

    Returns:
      A list of batches, each a dict of [batch_size, ...] arrays:
      'input_ids' int32 [B, L], 'attention_mask' int32 [B, L] (1 on real tokens),
      'token_type_ids' int32 [B, L] and 'loss_mask' int32 [B, L] when the rows have them,
      'labels' [B] (int32, or float32 when any label is a float), 'index' int32 [B] (the row's
      position in `encoded`, -1 for a dummy), and with drop_remainder=False 'example_mask'
      int32 [B] (1 real, 0 dummy). Dummy rows repeat the batch's first row, so the model sees
      ordinary inputs; their loss_mask is 0, and metrics must weight by example_mask.

    Raises:
      ValueError: a row is longer than the largest bucket, or batch_size < 1.
    """
    if not encoded:
        return []
    buckets = sorted(buckets)
    lengths = np.array([len(row["input_ids"]) for row in encoded])
    bucket_length(int(lengths.max()), buckets)  # fail early, before any batch is built
    labels = None
    if "label" in encoded[0]:
        labels = np.asarray([row["label"] for row in encoded])
        labels = labels.astype(np.float32 if labels.dtype.kind == "f" else np.int32)
    groups = batch_indices(lengths, batch_size, seed=seed, epoch=epoch, shuffle=shuffle,
                           drop_remainder=drop_remainder)
    return [_collate(encoded, idx, lengths, labels, batch_size, pad_id, buckets,
                     with_example_mask=not drop_remainder) for idx in groups]


def _collate(encoded, idx, lengths, labels, batch_size, pad_id, buckets, *, with_example_mask):
    real = len(idx)
    # Dummy rows repeat the first real row: an all-padding row could give NaN attention.
    rows = np.concatenate([idx, np.full(batch_size - real, idx[0])]).astype(np.int64)
    width = bucket_length(int(lengths[idx].max()), buckets)
    batch = {"input_ids": np.full((batch_size, width), pad_id, np.int32),
             "attention_mask": np.zeros((batch_size, width), np.int32)}
    sequence_keys = [k for k in ("token_type_ids", "loss_mask") if k in encoded[0]]
    for key in sequence_keys:
        batch[key] = np.zeros((batch_size, width), np.int32)
    for b, r in enumerate(rows):
        n = lengths[r]
        batch["input_ids"][b, :n] = encoded[r]["input_ids"]
        batch["attention_mask"][b, :n] = 1
        for key in sequence_keys:
            batch[key][b, :n] = encoded[r][key]
    if "loss_mask" in batch:
        batch["loss_mask"][real:] = 0
    if labels is not None:
        batch["labels"] = labels[rows]
    batch["index"] = np.where(np.arange(batch_size) < real, rows, -1).astype(np.int32)
    if with_example_mask:
        batch["example_mask"] = (np.arange(batch_size) < real).astype(np.int32)
    return batch
