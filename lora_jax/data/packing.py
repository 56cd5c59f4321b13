"""Sequence packing: several short LM examples per row, kept apart by segment ids.

    rows = pack_examples(encoded, max_len=512)        # [[12, 40, 7, ...], ...] example indices
    batches = packed_batches(encoded, rows, 8, seed=0, epoch=3, pad_id=50256, buckets=BUCKETS)
    batches[i]["segment_ids"]   # [8, L]: 1..k for a row's k examples, 0 on padding
    batches[i]["position_ids"]  # [8, L]: 0.. restarting at each example

E2E rows are 30-80 tokens, so a batch padded to 512 is mostly padding. Packed rows waste
almost nothing; the model (`GPT2LMHeadModel(segment_ids=...)`) confines attention to a token's
own example, positions restart per example, and `losses.loss_sum` never scores a prediction
across an example boundary, so each example's loss is the same as when it is batched alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from lora_jax.data.batching import BUCKETS, bucket_length


def pack_examples(examples: Sequence[Mapping], max_len: int) -> list[list[int]]:
    """Groups examples into rows of at most `max_len` tokens, first-fit decreasing.

    Examples are placed longest first (ties: lower index first), each into the first row that
    still has room, so the result depends only on the lengths.

    Args:
      examples: rows with 'input_ids' (e.g. from `encode_e2e`).
      max_len: the most tokens a row holds.

    Returns:
      The rows, each a list of example indices in the order they sit in the row.

    Raises:
      ValueError: an example is empty or longer than `max_len` (named by index and length).
    """
    if max_len < 1:
        raise ValueError(f"max_len must be positive, got {max_len}")
    lengths = [len(e["input_ids"]) for e in examples]
    for i, n in enumerate(lengths):
        if n > max_len:
            raise ValueError(f"example {i} has {n} tokens, more than a packed row's "
                             f"max_len={max_len}")
        if n == 0:
            raise ValueError(f"example {i} is empty; a packed row cannot hold it")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free = _MaxTree(len(lengths), max_len)  # at most one row per example
    rows: list[list[int]] = []
    for i in order:
        r = free.first_at_least(lengths[i])
        if r == len(rows):
            rows.append([])
        rows[r].append(i)
        free.subtract(r, lengths[i])
    return rows


class _MaxTree:
    """Free space per row in a max segment tree: the first row with room for n tokens in
    O(log rows) (a linear scan over ~5,000 rows for each of E2E's 42k examples is too slow)."""

    def __init__(self, size: int, capacity: int):
        self.leaves = 1
        while self.leaves < max(size, 1):
            self.leaves *= 2
        # Unopened rows have full capacity, so "the first row with room" may be a new one.
        self.tree = [capacity] * (2 * self.leaves)

    def first_at_least(self, n: int) -> int:
        node = 1
        while node < self.leaves:
            node = 2 * node if self.tree[2 * node] >= n else 2 * node + 1
        return node - self.leaves

    def subtract(self, row: int, n: int) -> None:
        node = row + self.leaves
        self.tree[node] -= n
        while node > 1:
            node //= 2
            self.tree[node] = max(self.tree[2 * node], self.tree[2 * node + 1])


def packed_batches(
    examples: Sequence[Mapping],
    rows: Sequence[Sequence[int]],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    pad_id: int,
    buckets: Sequence[int] = BUCKETS,
) -> list[dict[str, np.ndarray]]:
    """One epoch of packed batches, a pure function of its arguments.

    Args:
      examples: rows with 'input_ids' and 'loss_mask' (from `encode_e2e`).
      rows: from `pack_examples(examples, max_len)`.
      batch_size: packed rows per batch; the rows left over after the last full batch are
        dropped (different ones each epoch).
      seed, epoch: fix the order of the rows; the same pair gives the same list.
      pad_id: the token id that fills the end of a row.
      buckets: allowed sequence lengths, ascending; a batch takes the smallest that holds its
        longest row, so only a few shapes compile.

    Returns:
      A list of batches, each a dict of int32 [batch_size, L] arrays: 'input_ids',
      'loss_mask' (the examples' own, 0 on padding), 'attention_mask' (1 on real tokens),
      'segment_ids' (1..k for a row's k examples in order, 0 on padding) and 'position_ids'
      (0..n-1 within each example, 0 on padding).

    Raises:
      ValueError: batch_size < 1, or a row longer than the largest bucket.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not rows:
        return []
    buckets = sorted(buckets)
    row_lengths = np.array([sum(len(examples[i]["input_ids"]) for i in row) for row in rows])
    bucket_length(int(row_lengths.max()), buckets)  # fail early, before any batch is built
    kept = len(rows) - len(rows) % batch_size
    order = np.random.default_rng([seed, epoch]).permutation(len(rows))[:kept]
    return [
        _collate_packed(examples, [rows[r] for r in idx],
                        bucket_length(int(row_lengths[idx].max()), buckets), pad_id)
        for idx in order.reshape(-1, batch_size)
    ]


def _collate_packed(examples, batch_rows, width: int, pad_id: int) -> dict[str, np.ndarray]:
    shape = (len(batch_rows), width)
    batch = {"input_ids": np.full(shape, pad_id, np.int32)}
    for key in ("loss_mask", "attention_mask", "segment_ids", "position_ids"):
        batch[key] = np.zeros(shape, np.int32)
    for b, row in enumerate(batch_rows):
        start = 0
        for segment, i in enumerate(row, start=1):
            ids = examples[i]["input_ids"]
            span = slice(start, start + len(ids))
            batch["input_ids"][b, span] = ids
            batch["loss_mask"][b, span] = examples[i]["loss_mask"]
            batch["attention_mask"][b, span] = 1
            batch["segment_ids"][b, span] = segment
            batch["position_ids"][b, span] = np.arange(len(ids))
            start += len(ids)
    return batch

