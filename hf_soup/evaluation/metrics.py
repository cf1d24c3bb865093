"""Task metrics as `evaluate` modules.

`evaluate.load("accuracy")` downloads and runs a metric script from the Hub at run time, which fails offline
and executes remote code. So the GLUE metrics are defined here as `evaluate.Metric` subclasses with the same
names and the same math (scikit-learn and scipy, as the Hub scripts use). Image classification adds
`top5_accuracy`, computed from the scores with scikit-learn's `top_k_accuracy_score`.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef, top_k_accuracy_score

# Metrics computed from each example's scores (logits) rather than from one predicted label.
SCORE_METRICS = {"top5_accuracy": 5}
# Metrics where lower is better (causal LMs: `language_modeling.py`); every other metric is a fraction in [0, 1]
# where higher is better, and its differences are shown in points (x 100).
LOWER_IS_BETTER = frozenset({"perplexity", "nll"})


def _correlation(function):
    """A correlation of references and predictions; 0 when either is constant (undefined there)."""
    return lambda y, p: float(function(y, p)[0]) if np.std(p) > 0 and np.std(y) > 0 else 0.0


# The metrics' math, once: the `evaluate` metrics below call it, and so does the bootstrap (`stats.py`), which calls
# each one a thousand times, where an `evaluate.Metric` costs ~10 ms per call in bookkeeping alone.
METRIC_FUNCTIONS = {
    "accuracy": lambda y, p: float(np.mean(np.asarray(y) == np.asarray(p))),
    "f1": lambda y, p, pos_label=1: float(
        f1_score(y, p, pos_label=pos_label, average="binary", zero_division=0.0)
    ),
    "macro_f1": lambda y, p: float(
        f1_score(y, p, average="macro", zero_division=0.0)
    ),  # the mean per-class F1
    "matthews_correlation": lambda y, p: float(matthews_corrcoef(y, p)),
    "pearson": _correlation(pearsonr),
    "spearmanr": _correlation(spearmanr),
}


def higher_is_better(metric: str, value: float) -> float:
    """`value` in "higher is better" units: negated for losses and perplexity."""
    return -value if metric in LOWER_IS_BETTER else value


def describe_delta(metric: str, delta: float) -> str:
    """A difference in a metric's own terms: `+0.80 points of accuracy`, `-0.412 perplexity (lower is better)`."""
    if metric in LOWER_IS_BETTER:
        return f"{delta:+.3f} {metric} (lower is better)"
    return f"{delta * 100:+.2f} points of {metric}"


_CITATION = "Wang et al. 2019, GLUE: A Multi-Task Benchmark and Analysis Platform for NLU (arXiv 1804.07461)."


class TaskMetric(evaluate.Metric):
    """One GLUE-style metric; `config_name` picks which (`accuracy`, `f1`, `matthews_correlation`, ...)."""

    def _info(self) -> evaluate.MetricInfo:
        dtype = "float32" if self.config_name in ("pearson", "spearmanr") else "int64"
        if self.config_name in SCORE_METRICS:
            predictions = datasets.Sequence(datasets.Value("float32"))
            references = datasets.Value("int64")
        else:
            predictions = references = datasets.Value(dtype)
        return evaluate.MetricInfo(
            description=f"{self.config_name}, computed as in the GLUE metric.",
            citation=_CITATION,
            inputs_description="predictions and references: one value per example (for top-k: one score per "
            "class per example).",
            features=datasets.Features({"predictions": predictions, "references": references}),
        )

    def _compute(self, predictions, references, pos_label: int = 1):
        name = self.config_name
        if name == "f1":
            value = METRIC_FUNCTIONS[name](references, predictions, pos_label=pos_label)
        elif name in METRIC_FUNCTIONS:
            value = METRIC_FUNCTIONS[name](references, predictions)
        elif name in SCORE_METRICS:
            scores = np.asarray(predictions)
            value = top_k_accuracy_score(
                references, scores, k=SCORE_METRICS[name], labels=np.arange(scores.shape[1])
            )
        else:
            raise ValueError(f"Unknown metric {name!r}")
        return {name: float(value)}


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
        kwargs = {"pos_label": pos_label} if name == "f1" else {}
        inputs = scores if name in SCORE_METRICS else predictions
        results.update(
            TaskMetric(config_name=name, keep_in_memory=True).compute(
                predictions=inputs, references=references, **kwargs
            )
        )
    return results
