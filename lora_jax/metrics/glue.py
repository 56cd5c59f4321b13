"""GLUE metrics in numpy, with the definitions of GLUE and the LoRA paper.

    glue_metrics("mrpc", predictions, labels)  # {'accuracy': 0.897..., 'f1': 0.926...}
    main_metric("cola")                         # 'matthews_corrcoef', the number the paper reports

Predictions are class ids (argmax of the logits), or scores for stsb.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike



def accuracy(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of predictions equal to the labels."""
    predictions, labels = _pair(predictions, labels)
    return float(np.mean(predictions == labels))


def f1(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Binary F1 of the positive class 1: 2 TP / (2 TP + FP + FN); 0.0 when there is no
    positive in either (as scikit-learn)."""
    predictions, labels = _pair(predictions, labels)
    tp = np.sum((predictions == 1) & (labels == 1))
    wrong = np.sum(predictions != labels)  # FP + FN
    return float(2 * tp / (2 * tp + wrong)) if tp + wrong else 0.0


def matthews_corrcoef(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Matthews correlation (multi-class form of Gorodkin 2004, binary MCC for two classes).

    Returns 0.0 when it is undefined, e.g. a constant prediction (as scikit-learn).
    """
    predictions, labels = _pair(predictions, labels)
    classes, codes = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
    k, n = len(classes), len(labels)
    confusion = np.zeros((k, k), np.float64)
    np.add.at(confusion, (codes[:n], codes[n:]), 1.0)
    true_counts, pred_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    cov_yp = np.trace(confusion) * n - true_counts @ pred_counts
    cov_yy = n * n - true_counts @ true_counts
    cov_pp = n * n - pred_counts @ pred_counts
    return float(cov_yp / np.sqrt(cov_yy * cov_pp)) if cov_yy * cov_pp else 0.0


def pearson(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Pearson correlation; nan when either input is constant (as scipy)."""
    x, y = _pair(predictions, labels, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    norm = np.sqrt((x @ x) * (y @ y))
    return float(np.clip(x @ y / norm, -1.0, 1.0)) if norm else float("nan")


def spearman(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Spearman correlation: Pearson of the ranks, ties given their average rank."""
    x, y = _pair(predictions, labels, dtype=np.float64)
    return pearson(_average_ranks(x), _average_ranks(y))


METRICS: dict[str, Callable[[ArrayLike, ArrayLike], float]] = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews_corrcoef": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}


# Each GLUE task's metrics, the one the LoRA paper reports first (mnli: matched accuracy).
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "mnli": ("accuracy",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "cola": ("matthews_corrcoef",),
    "qnli": ("accuracy",),
    "qqp": ("accuracy", "f1"),
    "rte": ("accuracy",),
    "stsb": ("pearson", "spearman"),
}


def task_metrics(task: str) -> tuple[str, ...]:
    """The names of a GLUE task's metrics, the paper's first.

    Raises:
      ValueError: an unknown task; the message lists the known ones.
    """
    if task not in TASK_METRICS:
        raise ValueError(f"unknown GLUE task {task!r}; known tasks: {', '.join(TASK_METRICS)}")
    return TASK_METRICS[task]


def glue_metrics(task: str, predictions: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """The task's GLUE metrics: accuracy (mnli, sst2, qnli, rte), accuracy and F1 (mrpc, qqp),
    Matthews correlation (cola), Pearson and Spearman (stsb).

    Args:
      task: a GLUE task name, as in `TASK_METRICS`.
      predictions: [N] class ids, or scores for stsb.
      labels: [N] class ids, or gold scores for stsb.

    Returns:
      {metric name: value}, the paper's reported metric first.
    """
    return {name: METRICS[name](predictions, labels) for name in task_metrics(task)}


def main_metric(task: str) -> str:
    """The metric the LoRA paper reports for a task: 'accuracy' (matched, for mnli),
    'matthews_corrcoef' (cola) or 'pearson' (stsb)."""
    return task_metrics(task)[0]


def _pair(predictions, labels, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    predictions, labels = np.asarray(predictions, dtype), np.asarray(labels, dtype)
    if predictions.ndim != 1 or predictions.shape != labels.shape or not len(labels):
        raise ValueError(f"expected non-empty 1-D predictions and labels of one shape, got "
                         f"{predictions.shape} and {labels.shape}")
    return predictions, labels


def _average_ranks(values: np.ndarray) -> np.ndarray:
    # Ranks 1..n by value; a run of equal values gets the mean of the ranks it spans.
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # the rank of each distinct value's last occurrence
    return (last - (counts - 1) / 2.0)[inverse]
