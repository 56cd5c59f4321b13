"""GLUE metrics against scikit-learn and scipy, ties and degenerate cases included."""

import math

import numpy as np
import pytest

from lora_jax.metrics import glue as metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics")
stats = pytest.importorskip("scipy.stats")

SEEDS = range(20)


def random_classes(seed, k=2, n=None):
    rng = np.random.default_rng(seed)
    n = n or int(rng.integers(2, 300))
    return rng.integers(0, k, n), rng.integers(0, k, n)


@pytest.mark.parametrize("seed", SEEDS)
def test_classification_parity(seed):
    predictions, labels = random_classes(seed)
    assert metrics.accuracy(predictions, labels) == pytest.approx(
        sklearn_metrics.accuracy_score(labels, predictions), abs=1e-12)
    assert metrics.f1(predictions, labels) == pytest.approx(
        sklearn_metrics.f1_score(labels, predictions), abs=1e-12)
    assert metrics.matthews_corrcoef(predictions, labels) == pytest.approx(
        sklearn_metrics.matthews_corrcoef(labels, predictions), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_multiclass_matthews_parity(seed):
    predictions, labels = random_classes(seed, k=3)
    assert metrics.matthews_corrcoef(predictions, labels) == pytest.approx(
        sklearn_metrics.matthews_corrcoef(labels, predictions), abs=1e-12)
    assert metrics.accuracy(predictions, labels) == pytest.approx(
        sklearn_metrics.accuracy_score(labels, predictions), abs=1e-12)


@pytest.mark.filterwarnings("ignore:A single label was found")  # sklearn, on all-one-class input
@pytest.mark.parametrize("predictions,labels", [
    ([1, 1, 1, 1], [0, 1, 1, 0]),  # constant prediction
    ([0, 0, 0, 0], [0, 1, 1, 0]),
    ([0, 1, 1, 0], [1, 1, 1, 1]),  # constant labels
    ([1, 1], [1, 1]),              # everything one class, all right
    ([0, 0, 0], [0, 0, 0]),        # no positives anywhere: F1 undefined -> 0
    ([1, 0, 1, 0], [0, 1, 0, 1]),  # all wrong: MCC -1
    ([0, 1, 0, 1], [0, 1, 0, 1]),  # all right: MCC 1
    ([2, 2, 2], [0, 1, 2]),        # multi-class constant
])
def test_degenerate_cases_as_sklearn(predictions, labels):
    assert metrics.matthews_corrcoef(predictions, labels) == pytest.approx(
        sklearn_metrics.matthews_corrcoef(labels, predictions), abs=1e-12)
    if max(predictions + labels) <= 1:
        assert metrics.f1(predictions, labels) == pytest.approx(
            sklearn_metrics.f1_score(labels, predictions, zero_division=0.0), abs=1e-12)


def test_constant_prediction_mcc_is_zero():
    assert metrics.matthews_corrcoef([1] * 10, [0, 1] * 5) == 0.0


@pytest.mark.parametrize("seed", SEEDS)
def test_correlation_parity(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 500))
    labels = rng.uniform(0, 5, n)
    predictions = labels + rng.normal(0, 1 + seed % 3, n)
    assert metrics.pearson(predictions, labels) == pytest.approx(
        stats.pearsonr(predictions, labels)[0], abs=1e-12)
    assert metrics.spearman(predictions, labels) == pytest.approx(
        stats.spearmanr(predictions, labels)[0], abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_spearman_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 400))
    # STS-B gold scores are on a coarse grid (x.x or x.xx), so ties are common.
    labels = rng.integers(0, 11, n) / 2.0
    predictions = np.round(labels + rng.normal(0, 1, n), 1)
    assert metrics.spearman(predictions, labels) == pytest.approx(
        stats.spearmanr(predictions, labels)[0], abs=1e-12)
    np.testing.assert_allclose(metrics._average_ranks(labels), stats.rankdata(labels), atol=0)


def test_degenerate_correlations_as_scipy():
    with pytest.warns(stats.ConstantInputWarning):
        expected = stats.pearsonr([2.0, 2.0, 2.0], [1.0, 2.0, 3.0])[0]
    assert math.isnan(expected) and math.isnan(metrics.pearson([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]))
    assert math.isnan(metrics.spearman([1.0, 2.0, 3.0], [4.0, 4.0, 4.0]))
    assert metrics.pearson([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == pytest.approx(1.0, abs=1e-15)
    assert metrics.spearman([1, 2, 3, 4], [10, 9, 3, -5]) == pytest.approx(-1.0, abs=1e-15)


def test_glue_metrics_per_task():
    predictions, labels = random_classes(0, n=200)
    expected = {
        "mnli": {"accuracy"}, "sst2": {"accuracy"}, "qnli": {"accuracy"}, "rte": {"accuracy"},
        "mrpc": {"accuracy", "f1"}, "qqp": {"accuracy", "f1"}, "cola": {"matthews_corrcoef"},
    }
    for task, names in expected.items():
        result = metrics.glue_metrics(task, predictions, labels)
        assert set(result) == names and all(isinstance(v, float) for v in result.values())
    mrpc = metrics.glue_metrics("mrpc", predictions, labels)
    assert mrpc["f1"] == pytest.approx(sklearn_metrics.f1_score(labels, predictions), abs=1e-12)
    scores = np.linspace(0, 5, 50)
    stsb = metrics.glue_metrics("stsb", scores ** 2, scores)
    assert list(stsb) == ["pearson", "spearman"] and stsb["spearman"] == pytest.approx(1.0)


def test_main_metric():
    assert {t: metrics.main_metric(t) for t in ("mnli", "sst2", "mrpc", "cola", "qnli", "qqp",
                                                "rte", "stsb")} == {
        "mnli": "accuracy", "sst2": "accuracy", "mrpc": "accuracy", "cola": "matthews_corrcoef",
        "qnli": "accuracy", "qqp": "accuracy", "rte": "accuracy", "stsb": "pearson"}
    with pytest.raises(ValueError, match="unknown GLUE task"):
        metrics.main_metric("wnli")


def test_shape_errors():
    with pytest.raises(ValueError, match="one shape"):
        metrics.accuracy([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="non-empty"):
        metrics.f1([], [])
    with pytest.raises(ValueError, match="1-D"):
        metrics.accuracy(np.zeros((2, 2)), np.zeros((2, 2)))
