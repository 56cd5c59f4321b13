"""What a run learns: each task's data, loss and evaluation, from a config.

GLUE tasks are sequence classification (or regression for STS-B) on an encoder; E2E is language
modelling on GPT-2 with the loss on the reference tokens only; 'instruct' is language modelling
on instruction data (data/instruct.py) with the loss on the response tokens only.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from lora_jax.data import batching, e2e, glue, instruct, packing
from lora_jax.errors import ConfigError
from lora_jax.metrics import glue as glue_metrics


@dataclasses.dataclass
class Task:
    """Encoded examples and how to batch, score and evaluate them."""

    name: str
    kind: str  # 'classification', 'regression' or 'lm'
    num_labels: int | None
    train: list[dict]
    eval: list[dict]
    pad_id: int
    buckets: tuple[int, ...]
    main_metric: str
    packing: bool = False  # training rows pack several examples (LM tasks; see data/packing.py)
    max_len: int = 0  # the tokens a packed row holds

    @functools.cached_property
    def packed_rows(self) -> list[list[int]]:
        """The training examples' packing into rows of `max_len` tokens (computed once: the
        rows are the same every epoch, only their order changes)."""
        return packing.pack_examples(self.train, self.max_len)

    def prepared(self, prepare) -> "Task":
        """The task with `prepare(example)` applied to every example (a method's input change,
        e.g. PreEmbed's virtual tokens); the packing is recomputed from the new lengths."""
        return dataclasses.replace(self, train=[prepare(e) for e in self.train],
                                   eval=[prepare(e) for e in self.eval])

    def steps_per_epoch(self, batch_size: int) -> int:
        """len(train_batches(batch_size, ...)): full batches of rows, packed or not."""
        rows = len(self.packed_rows) if self.packing else len(self.train)
        return batching.steps_per_epoch(rows, batch_size)

    def train_batches(self, batch_size: int, seed: int, epoch: int) -> list[dict]:
        """One epoch's batches: a pure function of (seed, epoch), so a run can resume mid-epoch.
        With packing a batch holds `batch_size` packed rows."""
        if self.packing:
            return packing.packed_batches(self.train, self.packed_rows, batch_size, seed=seed,
                                          epoch=epoch, pad_id=self.pad_id, buckets=self.buckets)
        return batching.epoch_batches(self.train, batch_size, seed=seed, epoch=epoch,
                                      pad_id=self.pad_id, buckets=self.buckets)

    def eval_batches(self, batch_size: int) -> list[dict]:
        return batching.epoch_batches(self.eval, batch_size, seed=0, epoch=0, shuffle=False,
                                      pad_id=self.pad_id, buckets=self.buckets,
                                      drop_remainder=False)

    def metrics(self, predictions: np.ndarray, labels: np.ndarray, eval_loss: float) -> dict:
        if self.kind == "lm":
            return {"loss": eval_loss, "perplexity": float(np.exp(eval_loss))}
        return {"loss": eval_loss, **glue_metrics.glue_metrics(self.name, predictions, labels)}


def build_task(data_config: Any, tokenizer: Any, with_train: bool = True) -> Task:
    """Reads and tokenizes the configured task (`data_config.task`: a GLUE task, 'e2e' or
    'instruct').

    `with_train=False` (evaluation) leaves the training split unencoded: `Task.train` is empty.
    """
    if data_config.task == "e2e":
        return _e2e_task(data_config, tokenizer, with_train)
    if data_config.task == "instruct":
        return _instruct_task(data_config, tokenizer, with_train)
    return _glue_task(data_config, tokenizer, with_train)


def _limit(examples: list, n: int | None) -> list:
    """The first n examples (for quick runs and tests); all when n is 0 or None."""
    return examples[:n] if n else examples


def _e2e_task(cfg: Any, tokenizer: Any, with_train: bool) -> Task:
    def split(name: str, limit: int | None) -> list[dict]:
        if name == "train" and not with_train:
            return []
        pairs = e2e.read_e2e(name, data_dir=cfg.data_dir, source=cfg.source)
        return e2e.encode_e2e(_limit(pairs, limit), tokenizer, cfg.max_len)

    return Task("e2e", "lm", None, split("train", cfg.max_train_examples),
                split("dev", cfg.max_eval_examples), tokenizer.eos_token_id, tuple(cfg.buckets),
                "loss", packing=_packing(cfg), max_len=cfg.max_len)


def _instruct_splits(cfg: Any) -> tuple[list, list]:
    """(train, eval) records of the 'instruct' task: the training file `data.path`, evaluated
    on `data.eval_path` when set, else on the training file's last `data.eval_fraction`
    (`instruct.hold_out`), which training then never sees."""
    def read(path: str) -> list:
        return instruct.read_instructions(path, source=cfg.source, on_malformed=cfg.on_malformed)

    if not cfg.get("path"):
        raise ConfigError("data.task 'instruct' needs data.path: a .json or .jsonl file of "
                          "instruction records (or a hub id with data.source 'hub')")
    if cfg.get("eval_path"):
        return read(cfg.path), read(cfg.eval_path)
    return instruct.hold_out(read(cfg.path), cfg.eval_fraction)


def _instruct_task(cfg: Any, tokenizer: Any, with_train: bool) -> Task:
    train, evaluation = _instruct_splits(cfg)

    def encode(records: list, limit: int | None) -> list[dict]:
        return instruct.encode_instructions(_limit(records, limit), tokenizer, cfg.max_len,
                                            template=cfg.template)

    # Llama's tokenizers have no pad token; padded positions are masked out, any id will do.
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    return Task("instruct", "lm", None,
                encode(train, cfg.max_train_examples) if with_train else [],
                encode(evaluation, cfg.max_eval_examples), pad_id, tuple(cfg.buckets), "loss",
                packing=_packing(cfg), max_len=cfg.max_len)


def _packing(cfg: Any) -> bool:
    # .get: the config.json of a run from before data.packing existed has no such field.
    return bool(cfg.get("packing", False))


def _glue_task(cfg: Any, tokenizer: Any, with_train: bool) -> Task:
    if _packing(cfg):
        # Classification reads one label per row: packed examples would share it.
        raise ValueError(f"data.packing applies to language-model tasks (e2e), not {cfg.task}")

    def split(name: str, limit: int | None) -> list[dict]:
        if name == "train" and not with_train:
            return []
        examples = glue.read_glue(cfg.task, name, data_dir=cfg.data_dir, source=cfg.source,
                                  on_malformed=cfg.on_malformed)
        return batching.encode_glue(_limit(examples, limit), tokenizer, cfg.max_len)

    num_labels = glue.TASKS[cfg.task].num_labels
    kind = "regression" if num_labels == 1 else "classification"
    return Task(cfg.task, kind, num_labels, split("train", cfg.max_train_examples),
                split("dev", cfg.max_eval_examples), tokenizer.pad_token_id, tuple(cfg.buckets),
                glue_metrics.main_metric(cfg.task))
