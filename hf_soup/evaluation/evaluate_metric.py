"""hf-soup's task metrics as an `evaluate` module, for code that wants one (`evaluate.combine`, a `Trainer`'s
`compute_metrics`): the same values as `metrics.compute_metrics`, from the same functions.

hf-soup itself calls the functions directly (`metrics.py` says why); importing this module imports `evaluate`.

    >>> TaskMetric(config_name="accuracy").compute(predictions=[1, 0], references=[1, 1])
    {'accuracy': 0.5}
"""

from __future__ import annotations

import datasets
import evaluate

from .metrics import SCORE_METRICS, metric_value

_CITATION = "Wang et al. 2019, GLUE: A Multi-Task Benchmark and Analysis Platform for NLU (arXiv 1804.07461)."


class TaskMetric(evaluate.Metric):
    """One GLUE-style metric; `config_name` picks which (`accuracy`, `f1`, `matthews_correlation`, ...)."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name in SCORE_METRICS:
            predictions = datasets.Sequence(datasets.Value("float32"))
            references = datasets.Value("int64")
        else:
            dtype = "float64" if self.config_name in ("pearson", "spearmanr") else "int64"
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
        if name in SCORE_METRICS:
            return {name: metric_value(name, None, references, scores=predictions)}
        return {name: metric_value(name, predictions, references, pos_label=pos_label)}
