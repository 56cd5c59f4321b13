"""GLUE tasks from the original TSV files (the `download_glue_data.py` layout) or the HF hub.

    examples = read_glue("rte", "dev")          # <data_dir>/glue/RTE/dev.tsv
    examples[0]  # Example(text_a='Dana Reeve, ...', text_b='Christopher Reeve had ...', label=1)

Class ids follow Hugging Face's `nyu-mll/glue` so that files and hub give the same labels
(and a head trained on one evaluates on the other).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import pathlib
from collections.abc import Iterable, Mapping
from typing import Literal, NamedTuple

from lora_jax.data import resolve as resolve_data_dir
from lora_jax.metrics.glue import task_metrics

logger = logging.getLogger(__name__)

HUB_ID = "nyu-mll/glue"
Source = Literal["files", "hub"]
OnMalformed = Literal["error", "skip"]


class Example(NamedTuple):
    """One GLUE example: a sentence or sentence pair and its class id (or, for stsb, score)."""

    text_a: str
    text_b: str | None
    label: int | float


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Where a GLUE task lives and how to read it.

    Attributes:
      name: the task's short name, also the hub config ('sst2').
      dirname: its folder in the original GLUE layout ('SST-2').
      files: split -> file name inside `dirname`.
      columns: the column names of a headerless file (CoLA); None: the file's header names them.
      text_a, text_b, label: the columns holding the text(s) and the label, by name.
      file_labels: the label strings as written in the files, indexed by class id; () for
        regression (stsb), where the label is a float score.
      label_names: readable class names, indexed by class id (HF `ClassLabel` names).
      hub_columns: the hub dataset's (text_a, text_b) columns; its label column is 'label'.
      hub_splits: split -> hub split name.
    """

    name: str
    dirname: str
    files: Mapping[str, str]
    columns: tuple[str, ...] | None
    text_a: str
    text_b: str | None
    label: str
    file_labels: tuple[str, ...]
    label_names: tuple[str, ...]
    hub_columns: tuple[str, str | None]
    hub_splits: Mapping[str, str]

    @property
    def num_labels(self) -> int:
        """Classes of the classifier head; 1 for stsb's regression."""
        return len(self.file_labels) or 1

    @property
    def is_regression(self) -> bool:
        return not self.file_labels

    @property
    def metrics(self) -> tuple[str, ...]:
        """Its GLUE metrics, the one the LoRA paper reports first (GLUE's definition, kept with
        the metrics: `lora_jax.metrics.glue.TASK_METRICS`)."""
        return task_metrics(self.name)


_SPLITS = {"train": "train.tsv", "dev": "dev.tsv"}
_HUB_SPLITS = {"train": "train", "dev": "validation"}

TASKS: Mapping[str, TaskSpec] = {
    spec.name: spec
    for spec in [
        TaskSpec(
            name="mnli", dirname="MNLI",
            # 'dev' is the matched set: the paper's MNLI number is matched accuracy.
            files={"train": "train.tsv", "dev": "dev_matched.tsv",
                   "dev_mismatched": "dev_mismatched.tsv"},
            columns=None, text_a="sentence1", text_b="sentence2", label="gold_label",
            file_labels=("entailment", "neutral", "contradiction"),
            label_names=("entailment", "neutral", "contradiction"),
            hub_columns=("premise", "hypothesis"),
            hub_splits={"train": "train", "dev": "validation_matched",
                        "dev_mismatched": "validation_mismatched"},
        ),
        TaskSpec(
            name="sst2", dirname="SST-2", files=_SPLITS,
            columns=None, text_a="sentence", text_b=None, label="label",
            file_labels=("0", "1"), label_names=("negative", "positive"),
            hub_columns=("sentence", None), hub_splits=_HUB_SPLITS,
        ),
        TaskSpec(
            name="mrpc", dirname="MRPC", files=_SPLITS,
            columns=None, text_a="#1 String", text_b="#2 String", label="Quality",
            file_labels=("0", "1"), label_names=("not_equivalent", "equivalent"),
            hub_columns=("sentence1", "sentence2"), hub_splits=_HUB_SPLITS,
        ),
        TaskSpec(
            name="cola", dirname="CoLA", files=_SPLITS,
            # The only GLUE file without a header.
            columns=("source", "label", "mark", "sentence"),
            text_a="sentence", text_b=None, label="label",
            file_labels=("0", "1"), label_names=("unacceptable", "acceptable"),
            hub_columns=("sentence", None), hub_splits=_HUB_SPLITS,
        ),
        TaskSpec(
            name="qnli", dirname="QNLI", files=_SPLITS,
            columns=None, text_a="question", text_b="sentence", label="label",
            file_labels=("entailment", "not_entailment"),
            label_names=("entailment", "not_entailment"),
            hub_columns=("question", "sentence"), hub_splits=_HUB_SPLITS,
        ),
        TaskSpec(
            name="qqp", dirname="QQP", files=_SPLITS,
            columns=None, text_a="question1", text_b="question2", label="is_duplicate",
            file_labels=("0", "1"), label_names=("not_duplicate", "duplicate"),
            hub_columns=("question1", "question2"), hub_splits=_HUB_SPLITS,
        ),
        TaskSpec(
            name="rte", dirname="RTE", files=_SPLITS,
            columns=None, text_a="sentence1", text_b="sentence2", label="label",
            file_labels=("entailment", "not_entailment"),
            label_names=("entailment", "not_entailment"),
            hub_columns=("sentence1", "sentence2"), hub_splits=_HUB_SPLITS,
        ),
        TaskSpec(
            name="stsb", dirname="STS-B", files=_SPLITS,
            columns=None, text_a="sentence1", text_b="sentence2", label="score",
            file_labels=(), label_names=(),
            hub_columns=("sentence1", "sentence2"), hub_splits=_HUB_SPLITS,
        ),
    ]
}


@dataclasses.dataclass(frozen=True)
class ReadReport:
    """What a read produced.

    Attributes:
      source: the file path, or 'nyu-mll/glue/<config>[<split>]' for the hub.
      examples: examples returned.
      skipped_lines: file line numbers (hub: row indices) of the malformed rows skipped.
    """

    source: str
    examples: int
    skipped_lines: tuple[int, ...] = ()

    @property
    def skipped(self) -> int:
        return len(self.skipped_lines)


def task_spec(task: str) -> TaskSpec:
    """The `TaskSpec` of a GLUE task name ('sst2', 'mnli', ...).

    Raises:
      ValueError: an unknown task; the message lists the known ones.
    """
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown GLUE task {task!r}; known tasks: {', '.join(TASKS)}") from None


def read_glue(
    task: str,
    split: str,
    *,
    data_dir: str | pathlib.Path | None = None,
    source: Source = "files",
    on_malformed: OnMalformed = "error",
) -> list[Example]:
    """The examples of one GLUE split.

    Args:
      task: 'mnli', 'sst2', 'mrpc', 'cola', 'qnli', 'qqp', 'rte' or 'stsb'.
      split: 'train' or 'dev' (for mnli, 'dev' is dev_matched; 'dev_mismatched' too).
      data_dir: the data root holding glue/; default `lora_jax.data.data_dir()`.
      source: 'files' (the original TSVs under <data_dir>/glue) or 'hub' (`nyu-mll/glue`
        through `datasets.load_dataset`; needs the network or a warm HF cache).
      on_malformed: 'error' raises on the first malformed row; 'skip' drops such rows and
        logs one warning with their count (`read_glue_with_report` also returns it).

    Returns:
      Examples in file order, labels as class ids (float scores for stsb).

    Raises:
      ValueError: an unknown task or split, or (on_malformed='error') a malformed row,
        named by file and line.
      FileNotFoundError: the TSV file is missing.
    """
    examples, _ = read_glue_with_report(
        task, split, data_dir=data_dir, source=source, on_malformed=on_malformed
    )
    return examples


def read_glue_with_report(
    task: str,
    split: str,
    *,
    data_dir: str | pathlib.Path | None = None,
    source: Source = "files",
    on_malformed: OnMalformed = "error",
) -> tuple[list[Example], ReadReport]:
    """`read_glue`, plus a `ReadReport` saying where the rows came from and which were skipped."""
    spec = task_spec(task)
    if split not in spec.files:
        raise ValueError(f"unknown split {split!r} for {task}; "
                         f"known splits: {', '.join(spec.files)}")
    if on_malformed not in ("error", "skip"):
        raise ValueError(f"on_malformed must be 'error' or 'skip', got {on_malformed!r}")
    if source == "files":
        examples, report = read_glue_file(spec, split_path(task, split, data_dir),
                                          on_malformed=on_malformed)
    elif source == "hub":
        examples, report = _read_hub(spec, split, on_malformed)
    else:
        raise ValueError(f"source must be 'files' or 'hub', got {source!r}")
    if report.skipped:
        logger.warning("%s: skipped %d malformed rows (first at line %d)",
                       report.source, report.skipped, report.skipped_lines[0])
    return examples, report


def split_path(task: str, split: str, data_dir: str | pathlib.Path | None = None) -> pathlib.Path:
    """The TSV file of one split: <data_dir>/glue/<dirname>/<file> (the original GLUE layout)."""
    spec = task_spec(task)
    if split not in spec.files:
        raise ValueError(f"unknown split {split!r} for {task}; "
                         f"known splits: {', '.join(spec.files)}")
    return resolve_data_dir(data_dir) / "glue" / spec.dirname / spec.files[split]


def read_glue_file(
    spec: TaskSpec, path: str | pathlib.Path, *, on_malformed: OnMalformed = "error"
) -> tuple[list[Example], ReadReport]:
    """Examples of one GLUE TSV file laid out as `spec` says.

    Returns:
      (examples, report); nothing is logged here.

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: a missing header column, or (on_malformed='error') a malformed row.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; set LORA_JAX_DATA_DIR to the folder that holds "
            f"glue/{spec.dirname}/{path.name} (the original GLUE TSV layout)"
        )
    examples, skipped = [], []
    # utf-8-sig: MRPC's header starts with a BOM, which would otherwise stick to 'Quality'.
    # QUOTE_NONE: GLUE text holds unbalanced quotes (MRPC, MNLI) that are plain characters.
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        columns = spec.columns or _header(spec, path, next(rows, None))
        a = columns.index(spec.text_a)
        b = columns.index(spec.text_b) if spec.text_b else None
        y = columns.index(spec.label)
        for row in rows:
            if not row:  # a blank line (e.g. a doubled newline at the end): no record
                continue
            try:
                if len(row) != len(columns):
                    raise _Malformed(f"expected {len(columns)} tab-separated fields "
                                     f"({', '.join(columns)}), got {len(row)}")
                label = _parse_label(spec, row[y])
            except _Malformed as err:
                if on_malformed == "error":
                    raise ValueError(f"{path}:{rows.line_num}: {err}") from None
                skipped.append(rows.line_num)
                continue
            examples.append(Example(row[a], row[b] if b is not None else None, label))
    return examples, ReadReport(str(path), len(examples), tuple(skipped))


class _Malformed(Exception):
    """A row that does not parse; the caller adds file and line."""


def _header(spec: TaskSpec, path: pathlib.Path, header: list[str] | None) -> tuple[str, ...]:
    needed = [c for c in (spec.text_a, spec.text_b, spec.label) if c]
    if header is None or any(c not in header for c in needed):
        raise ValueError(f"{path}:1: expected a header with the columns {needed}, got {header}")
    return tuple(header)


def _parse_label(spec: TaskSpec, text: str) -> int | float:
    if spec.is_regression:
        try:
            score = float(text)
        except ValueError:
            raise _Malformed(f"expected a float score, got {text!r}") from None
        if not math.isfinite(score):
            raise _Malformed(f"expected a finite score, got {text!r}")
        return score
    try:
        return spec.file_labels.index(text)
    except ValueError:
        raise _Malformed(f"expected a label in {list(spec.file_labels)}, got {text!r}") from None


def _read_hub(spec: TaskSpec, split: str, on_malformed: OnMalformed
              ) -> tuple[list[Example], ReadReport]:
    import datasets  # deferred: importing datasets costs about a second

    hub_split = spec.hub_splits[split]
    rows: Iterable[Mapping] = datasets.load_dataset(HUB_ID, spec.name, split=hub_split)
    col_a, col_b = spec.hub_columns
    name = f"{HUB_ID}/{spec.name}[{hub_split}]"
    examples, skipped = [], []
    for i, row in enumerate(rows):
        label = row["label"]
        if spec.is_regression:
            ok = isinstance(label, (int, float)) and math.isfinite(label)
        else:
            # The hub's test splits carry label -1 (hidden); any id out of range is malformed.
            ok = isinstance(label, int) and 0 <= label < spec.num_labels
        if not ok:
            if on_malformed == "error":
                raise ValueError(f"{name} row {i}: expected a label in [0, {spec.num_labels}), "
                                 f"got {row['label']!r}")
            skipped.append(i)
            continue
        label = float(label) if spec.is_regression else label
        examples.append(Example(row[col_a], row[col_b] if col_b else None, label))
    return examples, ReadReport(name, len(examples), tuple(skipped))
