"""Is the gain real? Paired uncertainty on the report split, and warnings for selection splits that are too small.

Both compared models are scored on the *same* report examples, so the comparison is paired: a paired bootstrap
over examples gives an interval for the difference of every report metric, and McNemar's exact test (a binomial
test on the discordant pairs) gives a p-value for accuracy. The per-example predictions come from scoring; nothing
is recomputed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
from scipy.stats import binom

from .metrics import METRIC_FUNCTIONS  # the metrics' math, called directly (no `evaluate` bookkeeping)


def topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """1 where the true label is among an example's `k` highest scores, else 0."""
    top = np.argpartition(-np.asarray(logits), kth=min(k, logits.shape[1]) - 1, axis=1)[:, :k]
    return (top == np.asarray(labels)[:, None]).any(axis=1).astype(np.int64)


def _confusions(labels: np.ndarray, predictions: np.ndarray, indices: np.ndarray, classes: int) -> np.ndarray:
    """Confusion matrices `[resample, true class, predicted class]` of each row of `indices`, by one `bincount`."""
    codes = (labels.astype(np.int64) * classes + predictions.astype(np.int64))[indices]
    codes += np.arange(len(indices))[:, None] * classes * classes
    return np.bincount(codes.ravel(), minlength=len(indices) * classes * classes).reshape(
        -1, classes, classes
    )


def _f1_per_class(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per resample and class, F1 = 2TP / (2TP + FP + FN) (0 where undefined, as `zero_division=0`), and whether
    the class occurs in the labels or the predictions."""
    tp = np.diagonal(confusion, axis1=1, axis2=2).astype(np.float64)
    denominator = confusion.sum(axis=1) + confusion.sum(axis=2)  # 2TP + FP + FN
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return f1, denominator > 0


def _binary_f1(confusion: np.ndarray, pos_label: int) -> np.ndarray:
    return _f1_per_class(confusion)[0][:, pos_label]


def _macro_f1(confusion: np.ndarray, _pos_label: int) -> np.ndarray:
    """The mean F1 over the classes present in each resample (sklearn's `average="macro"`)."""
    f1, present = _f1_per_class(confusion)
    return (f1 * present).sum(axis=1) / np.maximum(present.sum(axis=1), 1)


def _matthews(confusion: np.ndarray, _pos_label: int) -> np.ndarray:
    """The multiclass Matthews correlation (sklearn's formula; 0 where undefined)."""
    confusion = confusion.astype(np.float64)
    true, predicted = confusion.sum(axis=2), confusion.sum(axis=1)
    correct, total = np.trace(confusion, axis1=1, axis2=2), confusion.sum(axis=(1, 2))
    covariance = correct * total - (true * predicted).sum(axis=1)
    spread = (total**2 - (predicted**2).sum(axis=1)) * (total**2 - (true**2).sum(axis=1))
    return np.divide(covariance, np.sqrt(spread), out=np.zeros_like(covariance), where=spread > 0)


# Metrics that follow from a confusion matrix: bootstrapped for all resamples at once, not with a thousand sklearn
# calls (about 4 ms each, in input validation).
CONFUSION_METRICS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "f1": _binary_f1,
    "macro_f1": _macro_f1,
    "matthews_correlation": _matthews,
}


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """`resamples` rows of `n` example indices drawn with replacement (`numpy.random.default_rng(seed)`)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def paired_bootstrap(
    metric: str,
    labels: np.ndarray,
    predictions_a: np.ndarray,
    predictions_b: np.ndarray,
    *,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    pos_label: int = 1,
) -> dict[str, float]:
    """The difference `metric(a) - metric(b)` and its percentile bootstrap interval, resampling examples in pairs.

    Example:
    ```python
    >>> paired_bootstrap("accuracy", y, soup_predictions, best_predictions)
    {'delta': 0.008, 'low': -0.002, 'high': 0.019}
    ```
    """
    labels, a, b = np.asarray(labels), np.asarray(predictions_a), np.asarray(predictions_b)
    function = METRIC_FUNCTIONS[metric]
    if metric == "f1":
        function = functools.partial(function, pos_label=pos_label)
    delta = function(labels, a) - function(labels, b)
    indices = bootstrap_indices(len(labels), resamples, seed)
    if metric == "accuracy":  # vectorised: the mean of per-example differences in correctness
        diffs = ((a == labels).astype(np.float64) - (b == labels).astype(np.float64))[indices].mean(axis=1)
    elif metric in CONFUSION_METRICS:  # vectorised: every resample's confusion matrix at once
        classes = int(max(labels.max(), a.max(), b.max())) + 1
        score = CONFUSION_METRICS[metric]
        diffs = score(_confusions(labels, a, indices, classes), pos_label) - score(
            _confusions(labels, b, indices, classes), pos_label
        )
    else:
        diffs = np.array([function(labels[i], a[i]) - function(labels[i], b[i]) for i in indices])
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return {"delta": float(delta), "low": float(low), "high": float(high)}


def mcnemar_exact(
    labels: np.ndarray, predictions_a: np.ndarray, predictions_b: np.ndarray
) -> dict[str, float]:
    """McNemar's exact test: a two-sided binomial test (p = 1/2) on the examples exactly one model gets right."""
    correct_a = np.asarray(predictions_a) == np.asarray(labels)
    correct_b = np.asarray(predictions_b) == np.asarray(labels)
    only_a, only_b = int(np.sum(correct_a & ~correct_b)), int(np.sum(~correct_a & correct_b))
    discordant = only_a + only_b
    p_value = 1.0 if discordant == 0 else min(1.0, 2 * float(binom.cdf(min(only_a, only_b), discordant, 0.5)))
    return {"only_a": only_a, "only_b": only_b, "p_value": p_value}


def compare(
    metrics: tuple[str, ...],
    labels: np.ndarray,
    predictions_a: np.ndarray,
    predictions_b: np.ndarray,
    *,
    resamples: int = 1000,
    seed: int = 0,
    pos_label: int = 1,
) -> dict[str, dict]:
    """Every report metric's paired difference (a − b) with its 95% interval, plus McNemar for accuracy."""
    out = {}
    for metric in metrics:
        result = paired_bootstrap(
            metric, labels, predictions_a, predictions_b, resamples=resamples, seed=seed, pos_label=pos_label
        )
        result["significant"] = result["low"] > 0 or result["high"] < 0
        if metric == "accuracy":
            result["mcnemar"] = mcnemar_exact(labels, predictions_a, predictions_b)
        out[metric] = result
    return out


def compare_documents(
    tokens: np.ndarray,
    nll_a: np.ndarray,
    nll_b: np.ndarray,
    *,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict]:
    """Causal LMs: the differences (a − b) in mean token NLL and in perplexity, with percentile intervals from a
    paired bootstrap over **documents** (tokens of one document are not independent).

    Args:
        tokens (`np.ndarray`): each document's number of predicted tokens.
        nll_a, nll_b (`np.ndarray`): each document's summed token NLL under the two models.

    Each resample draws documents with replacement and recomputes Σ NLL / Σ tokens for both models on them.
    """
    tokens, a, b = (np.asarray(x, dtype=np.float64) for x in (tokens, nll_a, nll_b))
    indices = bootstrap_indices(len(tokens), resamples, seed)
    counted = tokens[indices].sum(axis=1)
    per_token = {"a": a.sum() / tokens.sum(), "b": b.sum() / tokens.sum()}
    resampled = {"a": a[indices].sum(axis=1) / counted, "b": b[indices].sum(axis=1) / counted}
    tail = (1 - level) / 2 * 100
    out = {}
    for metric, transform in (("perplexity", np.exp), ("nll", lambda x: x)):
        diffs = transform(resampled["a"]) - transform(resampled["b"])
        low, high = np.percentile(diffs, [tail, 100 - tail])
        delta = float(transform(per_token["a"]) - transform(per_token["b"]))
        out[metric] = {
            "delta": delta,
            "low": float(low),
            "high": float(high),
            "significant": bool(low > 0 or high < 0),
        }
    return out


def small_split_warning(scores: list[float], n: int, metric: str = "accuracy") -> str | None:
    """A warning when the selection split cannot tell candidates apart.

    For accuracy: the standard error of the best candidate's accuracy, sqrt(p(1−p)/n), exceeds the spread
    (max − min) of the candidates' selection scores.
    """
    if metric != "accuracy" or len(scores) < 2 or n <= 0:
        return None
    best = max(scores)
    standard_error = math.sqrt(max(best * (1 - best), 1e-12) / n)
    spread = max(scores) - min(scores)
    if standard_error <= spread:
        return None
    return (
        f"The selection split ({n} examples) is too small to tell these candidates apart: the standard error of "
        f"accuracy ({standard_error:.4f}) exceeds the spread of candidate scores ({spread:.4f}). Use a larger "
        "--selection-fraction, or --selection-metric loss."
    )
