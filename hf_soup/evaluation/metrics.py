"""Task metrics: the GLUE metrics' math (scikit-learn and scipy, as the Hub's metric scripts use), and top-5
accuracy for image classification.

Computed by calling the functions directly rather than through `evaluate`: `evaluate.load("accuracy")` fetches and
runs a metric script from the Hub at run time (it fails offline, and it is remote code), and `import evaluate` alone
takes about 8 s on 2 cores, because the package imports `transformers.pipelines`, which every hf-soup run would
pay. The same metrics as `evaluate` modules are in `evaluation/evaluate_metric.py`, for code that wants one; a
test checks that both give the same values. scikit-learn and scipy are imported when a metric is first computed, so
that the reporting modules can use the constants here without them.
"""

from __future__ import annotations

import numpy as np

# Metrics computed from each example's scores (logits) rather than from one predicted label.
SCORE_METRICS = {"top5_accuracy": 5}
# Metrics where lower is better (causal LMs: `language_modeling.py`); every other metric is a fraction in [0, 1]
# where higher is better, and its differences are shown in points (x 100).
LOWER_IS_BETTER = frozenset({"perplexity", "nll"})


def _accuracy(y, p) -> float:
    return float(np.mean(np.asarray(y) == np.asarray(p)))


def _f1(y, p, pos_label: int = 1) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y, p, pos_label=pos_label, average="binary", zero_division=0.0))


def _macro_f1(y, p) -> float:
    """The mean per-class F1."""
    from sklearn.metrics import f1_score

    return float(f1_score(y, p, average="macro", zero_division=0.0))


def _matthews_correlation(y, p) -> float:
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(y, p))


def _correlation(name: str):
    """scipy's correlation `name` of references and predictions; 0 when either is constant (undefined there)."""

    def correlation(y, p) -> float:
        import scipy.stats

        if np.std(p) > 0 and np.std(y) > 0:
            return float(getattr(scipy.stats, name)(y, p)[0])
        return 0.0

    return correlation


def _top_k_accuracy(k: int):
    def top_k(y, scores) -> float:
        from sklearn.metrics import top_k_accuracy_score

        scores = np.asarray(scores)
        return float(top_k_accuracy_score(y, scores, k=k, labels=np.arange(scores.shape[1])))

    return top_k


# The metrics' math, once: `compute_metrics` calls it, and so does the bootstrap (`stats.py`), a thousand times.
METRIC_FUNCTIONS = {
    "accuracy": _accuracy,
    "f1": _f1,
    "macro_f1": _macro_f1,
    "matthews_correlation": _matthews_correlation,
    "pearson": _correlation("pearsonr"),
    "spearmanr": _correlation("spearmanr"),
}
# Computed from each example's scores (the logits), by name.
SCORE_FUNCTIONS = {name: _top_k_accuracy(k) for name, k in SCORE_METRICS.items()}


def higher_is_better(metric: str, value: float) -> float:
    """`value` in "higher is better" units: negated for losses and perplexity."""
    return -value if metric in LOWER_IS_BETTER else value


def describe_delta(metric: str, delta: float) -> str:
    """A difference in a metric's own terms: `+0.80 points of accuracy`, `-0.412 perplexity (lower is better)`."""
    if metric in LOWER_IS_BETTER:
        return f"{delta:+.3f} {metric} (lower is better)"
    return f"{delta * 100:+.2f} points of {metric}"


def compute_metrics(
    names: tuple[str, ...],
    predictions: np.ndarray,
    references: np.ndarray,
    pos_label: int = 1,
    scores: np.ndarray | None = None,
) -> dict[str, float]:
    """Compute each metric in `names` on one split; `scores` (the logits) feed the top-k metrics.

    Example:
    ```python
    >>> compute_metrics(("accuracy",), np.array([1, 0]), np.array([1, 1]))
    {'accuracy': 0.5}
    ```
    """
    results: dict[str, float] = {}
    for name in names:
        results[name] = metric_value(name, predictions, references, pos_label, scores)
    return results


def metric_value(
    name: str, predictions, references, pos_label: int = 1, scores: np.ndarray | None = None
) -> float:
    """One metric of one split: `predictions` are labels (or values, for regression); the top-k metrics read
    `scores` (one row of class scores per example)."""
    if name == "f1":
        return _f1(references, predictions, pos_label=pos_label)
    if name in METRIC_FUNCTIONS:
        return METRIC_FUNCTIONS[name](references, predictions)
    if name in SCORE_FUNCTIONS:
        return SCORE_FUNCTIONS[name](references, scores)
    raise ValueError(f"Unknown metric {name!r}")
