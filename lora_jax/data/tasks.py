"""What a run learns: each task's data, loss and evaluation, from a config.

GLUE tasks are sequence classification (or regression for STS-B) on an encoder; E2E is language
modelling on GPT-2 with the loss on the reference tokens only; 'instruct' is language modelling
on instruction data (data/instruct.py) with the loss on the response tokens only.

`TASKS` is the registry: data.task -> `TaskEntry` (how to build it, its loss kind and labels,
the files it reads, how `evaluate` scores it). The trainer, `evaluate`, the config checks and a
run's input record ask the entry instead of branching on the task's name:

    entry = task_entry(config.data.task)
    entry.model_task                        # None: a language model; else 'classification'
    task = entry.build(config.data, tokenizer, True)
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from lora_jax.data import batching, e2e, glue, instruct, packing
from lora_jax.data import resolve as resolve_data_dir
from lora_jax.errors import ConfigError
from lora_jax.metrics import e2e as e2e_metrics
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
    return task_entry(data_config.task).build(data_config, tokenizer, with_train)


def _limit(examples: list, n: int | None) -> list:
    """The first n examples (for quick runs and tests); all when n is 0 or None."""
    return examples[:n] if n else examples


def _e2e_task(cfg: Any, tokenizer: Any, with_train: bool) -> Task:
    def split(name: str, limit: int | None) -> list[dict]:
        if name == "train" and not with_train:
            return []
        pairs = _limit(e2e.read_e2e(name, data_dir=cfg.data_dir, source=cfg.source), limit)
        if instruct.has_chat_template(tokenizer):
            return instruct.encode_instructions([_mr_record(mr, ref) for mr, ref in pairs],
                                                tokenizer, cfg.max_len, "chat")
        return e2e.encode_e2e(pairs, tokenizer, cfg.max_len)

    return Task("e2e", "lm", None, split("train", cfg.max_train_examples),
                split("dev", cfg.max_eval_examples), tokenizer.eos_token_id, tuple(cfg.buckets),
                "loss", packing=_packing(cfg), max_len=cfg.max_len)


# What a chat model is asked before the MR: without it SmolLM2-Instruct, shown a bare MR, answers
# that it cannot help (zero-shot BLEU 0.02 on 32 test MRs), and the zero-shot floor of Table 3
# would measure the missing question rather than the model. Trained rows carry it too, so the
# floor and every tuned model read the same prompt.
E2E_INSTRUCTION = ("Write a short restaurant description in plain English that uses every "
                   "attribute of this meaning representation.")


def _mr_record(mr: str, ref: str = "") -> dict[str, str]:
    """An E2E pair as an instruction record: `E2E_INSTRUCTION`, then the MR (as the file writes
    it) as its input. A model with a chat template (SmolLM2-Instruct) reads and writes E2E through
    it; GPT-2 has none and keeps microsoft/LoRA's format (`e2e.encode_e2e`)."""
    return {"instruction": E2E_INSTRUCTION, "input": mr, "output": ref}


def _e2e_prompt(mr: str, tokenizer: Any) -> list[int]:
    """The generation prompt of an MR, in the format the task's rows were written in."""
    if instruct.has_chat_template(tokenizer):
        return instruct.prompt_ids(_mr_record(mr), tokenizer, "chat")
    return e2e.encode_prompt(mr, tokenizer)


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


# --- The registry ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Inputs:
    """The files a task reads for some splits, or the hub dataset it names instead.

    Attributes:
      root: the folder the files are recorded under (None for a hub dataset).
      files: the files, absolute.
      hub: the hub dataset(s) read instead of files, or None.
      missing: the message when files are absent; '{}' takes their list.
    """

    root: pathlib.Path | None
    files: list[pathlib.Path]
    hub: str | None = None
    missing: str = "{}"


@dataclasses.dataclass(frozen=True)
class Generation:
    """How `evaluate` scores a task by generating text: one output per source, decoded from its
    prompt, against all of that source's references.

    Attributes:
      references: (data config, split) -> [(source, [reference, ...]), ...] in file order.
      prompt: (source, tokenizer) -> the prompt's token ids.
      score: (references per source, outputs) -> {metric: value}.
    """

    references: Callable[[Any, str], list[tuple[str, list[str]]]]
    prompt: Callable[[str, Any], list[int]]
    score: Callable[[Sequence[Sequence[str]], Sequence[str]], dict[str, float]]


@dataclasses.dataclass(frozen=True)
class TaskEntry:
    """What the rest of lora_jax knows about one data.task.

    Attributes:
      kind: the loss: 'classification', 'regression' or 'lm'.
      num_labels: the head's outputs (1: regression); None for a language model.
      build: (data config, tokenizer, with_train) -> `Task`.
      inputs: (data config, splits) -> the `Inputs` a run reads (fingerprinted in inputs.json).
      eval_splits: the splits `evaluate` can score (their labels are public).
      generation: how `evaluate` scores generated text; None: the trainer's dev metrics.
      required: data fields the task needs set -> what they hold.
    """

    kind: str
    num_labels: int | None
    build: Callable[[Any, Any, bool], Task]
    inputs: Callable[[Any, Sequence[str]], Inputs]
    eval_splits: tuple[str, ...] = ("dev",)
    generation: Generation | None = None
    required: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def model_task(self) -> str | None:
        """The model.task it trains: None (the language model) or 'classification'."""
        return None if self.kind == "lm" else "classification"


_DATA_DIR_HINT = ("data files not found: {}; set LORA_JAX_DATA_DIR or config.data.data_dir to "
                  "the folder that holds glue/ and e2e/")


def _glue_inputs(data: Any, splits: Sequence[str]) -> Inputs:
    if data.source == "hub":  # named, not fingerprinted: they are not files here
        return Inputs(None, [], hub=glue.HUB_ID)
    root = resolve_data_dir(data.data_dir)
    return Inputs(root, [glue.split_path(data.task, s, root) for s in splits],
                  missing=_DATA_DIR_HINT)


def _e2e_inputs(data: Any, splits: Sequence[str]) -> Inputs:
    if data.source == "hub":
        return Inputs(None, [], hub=e2e.HUB_ID)
    root = resolve_data_dir(data.data_dir)
    return Inputs(root, [e2e.split_path(s, root) for s in splits], missing=_DATA_DIR_HINT)


def _instruct_inputs(data: Any, splits: Sequence[str]) -> Inputs:
    """The instruction files (data.path, and data.eval_path when evaluation has its own), under
    the folder that holds them all; they are named by path, not found under the data dir."""
    names = [data.path] if "train" in splits or not data.get("eval_path") else []
    if data.get("eval_path") and "dev" in splits:
        names.append(data.eval_path)
    if data.source == "hub":
        return Inputs(None, [], hub=", ".join(names))
    files = [pathlib.Path(n).expanduser().absolute() for n in names]
    return Inputs(pathlib.Path(os.path.commonpath([f.parent for f in files])), files,
                  missing="instruction files not found: {} (config.data.path, "
                          "config.data.eval_path)")


def _e2e_references(data: Any, split: str) -> list[tuple[str, list[str]]]:
    return e2e_metrics.group_by_mr(e2e.read_e2e(split, data_dir=data.data_dir,
                                                source=data.source))


def _glue_entry(spec: glue.TaskSpec) -> TaskEntry:
    return TaskEntry(kind="regression" if spec.is_regression else "classification",
                     num_labels=spec.num_labels, build=_glue_task, inputs=_glue_inputs)


TASKS: dict[str, TaskEntry] = {
    **{name: _glue_entry(spec) for name, spec in glue.TASKS.items()},
    "e2e": TaskEntry(kind="lm", num_labels=None, build=_e2e_task, inputs=_e2e_inputs,
                     eval_splits=("dev", "test"),
                     generation=Generation(references=_e2e_references, prompt=_e2e_prompt,
                                           score=e2e_metrics.e2e_scores)),
    "instruct": TaskEntry(kind="lm", num_labels=None, build=_instruct_task,
                          inputs=_instruct_inputs,
                          required={"path": "a .json or .jsonl file (with data.source 'hub', a "
                                            "dataset id)"}),
}


def task_entry(name: str) -> TaskEntry:
    """The registry's entry for a data.task.

    Raises:
      ValueError: an unknown task (the message lists the registered ones).
    """
    if name not in TASKS:
        raise ValueError(f"unknown data.task {name!r}; registered: {', '.join(TASKS)}")
    return TASKS[name]
