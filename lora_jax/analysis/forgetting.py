"""Forgetting: how much worse a tuned model predicts general text it never trained on (Biderman et
al. 2024, "LoRA Learns Less and Forgets Less", which plots the gain on the target task against
this loss on held-out text).

    forgetting = loss_after - loss_before     (mean nats per token, on the same texts)

Texts are read as plain text: each one the tokenizer's encoding (after its BOS where it adds one,
as in pretraining), every token predicted but the first. The loss is computed by the trainer's
own evaluation (`training.evaluation.evaluate` with the run's eval step), so every method, a
quantized base and a prefix method's virtual tokens are handled as in training; a model that did
not change gives the same loss bit for bit, and forgetting 0.

Example:
    texts = read_heldout(("sst2:dev", "cola:dev"))
    before = heldout_loss(setup.build(config), texts)["loss"]   # LoRA's B = 0: the base model
    after = heldout_loss(evaluate.load_run(workdir), texts)["loss"]
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

from lora_jax.data import glue
from lora_jax.data.instruct import bos_to_add
from lora_jax.data.tasks import Task
from lora_jax.training import evaluation, setup


def read_heldout(sources: Sequence[str], data_dir: str | pathlib.Path | None = None,
                 limit: int = 0) -> list[str]:
    """The sentences of GLUE splits named 'task:split' (e.g. 'sst2:dev'), in file order; both
    sentences of a pair task. `limit` > 0 keeps the first `limit` of each source.

    Raises:
      ValueError: a source that is not 'task:split', an unknown task or split.
      FileNotFoundError: the split's file is missing.
    """
    if not sources:
        raise ValueError("no held-out text named: give GLUE splits such as 'sst2:dev'")
    texts = []
    for source in sources:
        task, sep, split = source.partition(":")
        if not sep or not task or not split:
            raise ValueError(f"held-out text {source!r}: expected 'task:split', e.g. 'sst2:dev'")
        examples = glue.read_glue(task, split, data_dir=data_dir)
        sentences = [t for e in examples for t in (e.text_a, e.text_b) if t]
        texts += sentences[:limit] if limit > 0 else sentences
    return texts


def text_rows(texts: Sequence[str], tokenizer: Any, max_len: int) -> list[dict]:
    """Plain-text LM rows: {'input_ids', 'loss_mask'}, the loss on every token but the first
    (nothing precedes it), cut at `max_len` tokens. Texts of fewer than two tokens are dropped
    (they predict nothing)."""
    bos = bos_to_add(tokenizer)
    rows = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids = ([bos] if bos is not None else []) + list(ids)
        ids = ids[:max_len]
        if len(ids) >= 2:
            rows.append({"input_ids": ids, "loss_mask": [0] + [1] * (len(ids) - 1)})
    return rows


def heldout_loss(run: setup.Run, texts: Sequence[str], batch_size: int = 16) -> dict[str, float]:
    """{'loss': mean nats per predicted token, 'perplexity', 'tokens': how many were predicted}
    of the run's model (its methods applied as in training) on plain `texts`.

    Raises:
      ValueError: no text has two tokens.
    """
    data = run.config.data
    rows = text_rows(texts, run.tokenizer, data.max_len)
    if not rows:
        raise ValueError(f"none of the {len(texts)} held-out texts has two tokens to predict")
    pad_id = run.tokenizer.pad_token_id
    pad_id = run.tokenizer.eos_token_id if pad_id is None else pad_id
    vocab_size = run.vocab_size
    task = Task("heldout", "lm", None, [], rows, pad_id, tuple(data.buckets), "loss",
                max_len=data.max_len).prepared(
        lambda e: run.stack.prepare_example(e, data.max_len, vocab_size))
    scores = evaluation.evaluate(task, run.eval_step("lm"), run.frozen, run.trainable, run.mesh,
                                 batch_size)
    tokens = sum(sum(r["loss_mask"]) for r in rows)
    return {"loss": float(scores["loss"]), "perplexity": float(scores["perplexity"]),
            "tokens": tokens}
