"""Paired uncertainty and the small-split warning, against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import f1_score, matthews_corrcoef

from hf_soup.evaluation.stats import compare, mcnemar_exact, paired_bootstrap, small_split_warning


@pytest.fixture
def predictions():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 400)
    a = np.where(rng.random(400) < 0.85, labels, 1 - labels)
    b = np.where(rng.random(400) < 0.80, labels, 1 - labels)
    return labels, a, b


def test_bootstrap_matches_plain_numpy_resampling(predictions):
    labels, a, b = predictions
    ours = paired_bootstrap("accuracy", labels, a, b, resamples=1000, seed=3)
    rng = np.random.default_rng(3)
    diffs = []
    for row in rng.integers(0, len(labels), size=(1000, len(labels))):
        diffs.append(np.mean(a[row] == labels[row]) - np.mean(b[row] == labels[row]))
    assert ours["delta"] == pytest.approx(np.mean(a == labels) - np.mean(b == labels))
    assert ours["low"] == pytest.approx(np.percentile(diffs, 2.5), abs=1e-12)
    assert ours["high"] == pytest.approx(np.percentile(diffs, 97.5), abs=1e-12)

    f1 = paired_bootstrap("f1", labels, a, b, resamples=200, seed=5)
    rng = np.random.default_rng(5)
    expected = [
        f1_score(labels[r], a[r]) - f1_score(labels[r], b[r]) for r in rng.integers(0, 400, (200, 400))
    ]
    assert f1["low"] == pytest.approx(np.percentile(expected, 2.5), abs=1e-9)


@pytest.mark.parametrize(
    ("metric", "classes"),
    [("f1", 2), ("macro_f1", 2), ("macro_f1", 3), ("matthews_correlation", 2), ("matthews_correlation", 3)],
)
def test_confusion_metric_intervals_match_sklearn_on_every_resample(metric, classes):
    # 12 examples: many resamples lack a class, or predict a single one (the undefined cases).
    rng = np.random.default_rng(11)
    labels = rng.integers(0, classes, 12)
    a = np.where(rng.random(12) < 0.7, labels, rng.integers(0, classes, 12))
    b = np.where(rng.random(12) < 0.6, labels, rng.integers(0, classes, 12))
    functions = {
        "f1": lambda y, p: f1_score(y, p, pos_label=1, zero_division=0.0),
        "macro_f1": lambda y, p: f1_score(y, p, average="macro", zero_division=0.0),
        "matthews_correlation": matthews_corrcoef,
    }
    score = functions[metric]
    ours = paired_bootstrap(metric, labels, a, b, resamples=300, seed=2, level=0.5)
    rows = np.random.default_rng(2).integers(0, 12, (300, 12))
    expected = [score(labels[r], a[r]) - score(labels[r], b[r]) for r in rows]
    assert ours["delta"] == pytest.approx(score(labels, a) - score(labels, b), abs=1e-12)
    assert ours["low"] == pytest.approx(np.percentile(expected, 25), abs=1e-12)
    assert ours["high"] == pytest.approx(np.percentile(expected, 75), abs=1e-12)


def test_mcnemar_matches_scipy_binomtest(predictions):
    labels, a, b = predictions
    ours = mcnemar_exact(labels, a, b)
    only_a = int(np.sum((a == labels) & (b != labels)))
    only_b = int(np.sum((a != labels) & (b == labels)))
    assert (ours["only_a"], ours["only_b"]) == (only_a, only_b)
    assert ours["p_value"] == pytest.approx(binomtest(only_a, only_a + only_b, 0.5).pvalue, rel=1e-9)
    assert mcnemar_exact(labels, a, a)["p_value"] == 1.0


def test_significance_follows_the_interval(predictions):
    labels, a, _ = predictions
    worse = np.where(np.arange(400) < 120, 1 - labels, labels)  # 30 points worse
    result = compare(("accuracy",), labels, a, worse, resamples=500)["accuracy"]
    assert result["significant"] and result["low"] > 0 and result["mcnemar"]["p_value"] < 0.001
    same = compare(("accuracy",), labels, a, a, resamples=100)["accuracy"]
    assert not same["significant"]


def test_small_split_warning():
    # 50 examples, candidates within one point of each other: the standard error (~5 points) swamps the spread.
    assert "too small" in small_split_warning([0.80, 0.81, 0.805], n=50)
    # 5000 examples and a 10-point spread: well separated.
    assert small_split_warning([0.70, 0.80, 0.75], n=5000) is None


def test_intervals_only_for_metrics_hf_soup_can_recompute():
    """A Trainer's own metric names get no interval (never a KeyError), nor does F1 on more than two labels, whose
    averaging hf-soup cannot know; the paired bootstrap then runs on multiclass labels without crashing."""
    from hf_soup.evaluation.stats import compare
    from hf_soup.pipeline.summary import bootstrappable

    binary, multiclass = np.array([0, 1, 1, 0]), np.array([0, 1, 2, 2])
    assert bootstrappable(("accuracy", "f1", "precision", "auc"), binary) == ("accuracy", "f1")
    assert bootstrappable(("accuracy", "f1", "macro_f1"), multiclass) == ("accuracy", "macro_f1")
    kept = bootstrappable(("accuracy", "f1", "macro_f1"), multiclass)
    result = compare(kept, multiclass, np.array([0, 1, 2, 1]), np.array([0, 2, 2, 2]), resamples=50)
    assert set(result) == {"accuracy", "macro_f1"} and result["accuracy"]["delta"] == pytest.approx(0.0)
