"""Score mixtures with the user's own `transformers.Trainer`: its eval dataset, collator and `compute_metrics`.

`cook(..., trainer=trainer)` uses this instead of hf-soup's own data pipeline, so the soup is judged by the metric
the user already trusts:

- `trainer.eval_dataset` is the selection split (a second dataset can be given for the report);
- `trainer.predict` runs the evaluation (same collator, batch size and devices as the user's training);
- `args.metric_for_best_model` (default: the loss) and `args.greater_is_better` rank candidates and accept trials.

Scores go through the same content-keyed cache as hf-soup's own scorer. Early rejection is off: a user metric has
no bound that would make stopping early exact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..cache import JsonCache, cache_key
from ..errors import ConfigError, DatasetError
from ..evaluation.splits import EncodedSplit
from ..mixture import Mixture
from .scorer import SELECTION_LOSS, SplitScore, per_example_loss


@dataclass(frozen=True)
class TrainerTask:
    """The task as the trainer defines it (stands in for `TaskSpec` in reports)."""

    metrics: tuple[str, ...]
    primary_metric: str
    regression: bool
    name: str = "trainer"
    dataset: str = "trainer.eval_dataset"
    dataset_config: str | None = None
    causal_lm: bool = False  # a Trainer's compute_metrics scores classifiers here


def trainer_label_names(trainer) -> list[str] | None:
    """The label names, in id order, that the trainer's data and model use: the eval dataset's `ClassLabel`
    names, else the trainer model's `id2label` (unless generic `LABEL_k`). Candidates are aligned to them by name,
    exactly as the CLI aligns them to a dataset's labels."""
    import datasets

    data = trainer.eval_dataset
    for column in _LABEL_COLUMNS:
        if (
            data is not None
            and column in data.column_names
            and isinstance(data.features[column], datasets.ClassLabel)
        ):
            return list(data.features[column].names)
    id2label = getattr(getattr(trainer.model, "config", None), "id2label", None) or {}
    names = [id2label[i] for i in sorted(id2label)]
    if not names or all(name == f"LABEL_{i}" for i, name in enumerate(names)):
        return None
    return names


_LABEL_COLUMNS = ("labels", "label", "label_ids")


def _labels(dataset, split: str) -> np.ndarray:
    for column in _LABEL_COLUMNS:
        if column in dataset.column_names:
            return np.asarray(dataset[column])
    raise DatasetError(f"The trainer's {split} dataset has no labels column ('labels' or 'label').")


class TrainerScorer:
    """Scores mixtures through `trainer.predict`, with the interface of `scoring.Scorer`.

    Args:
        trainer (`Trainer`): its model must be the workbench's live model.
        workbench (`Workbench`): loads mixtures into `trainer.model`.
        datasets (`dict[str, Dataset]`): `"selection"` (the trainer's eval dataset) and report splits.
        fingerprints (`dict[str, str]`): content hashes of the ingredients, for cache keys.
        cache (`JsonCache`, *optional*): the score cache.
    """

    head = None  # no backbone soups here: the Trainer's model keeps its own head

    def __init__(
        self, trainer, workbench, datasets: dict, fingerprints: dict[str, str], cache: JsonCache | None
    ):
        self.trainer, self.workbench, self.datasets = trainer, workbench, datasets
        self.fingerprints, self.cache = fingerprints, cache
        self.collator = trainer.data_collator
        args = trainer.args
        metric = args.metric_for_best_model or SELECTION_LOSS
        self.selection_metric = metric.removeprefix("eval_")
        self.higher_is_better = (
            bool(args.greater_is_better) if args.greater_is_better is not None else metric != "loss"
        )
        self.early_rejection = False
        self.evaluations = self.examples_forwarded = self.early_stops = 0
        self.log: list[dict] = []
        self.splits = {
            name: EncodedSplit(name, [], _labels(data, name), np.arange(len(data)), data._fingerprint)
            for name, data in datasets.items()
        }
        regression = getattr(workbench.model.config, "num_labels", 2) == 1
        names = tuple(self._predict_metrics(datasets["selection"]))
        if self.selection_metric != SELECTION_LOSS and self.selection_metric not in names:
            raise ConfigError(
                f"metric_for_best_model={metric!r} is not among the trainer's metrics ({', '.join(names)}); "
                "set it to one of them, or to 'loss'."
            )
        primary = self.selection_metric if self.selection_metric in names else (names[0] if names else "loss")
        self.spec = TrainerTask(names, primary, regression)

    def _predict_metrics(self, dataset) -> list[str]:
        compute = self.trainer.compute_metrics
        if compute is None:
            return []
        probe = self.trainer.predict(dataset.select(range(min(2, len(dataset)))), metric_key_prefix="probe")
        return [
            k.removeprefix("probe_") for k in probe.metrics if k.removeprefix("probe_") not in _TRAINER_EXTRAS
        ]

    def _key(self, mixture: Mixture, split: str) -> str:
        return cache_key(
            "trainer-score",
            mixture.content_key(self.fingerprints),
            self.splits[split].fingerprint,
            self.spec.metrics,
        )

    def score(self, mixture: Mixture, split_name: str) -> SplitScore:
        key = self._key(mixture, split_name)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            return SplitScore.from_dict(hit)
        started = time.perf_counter()
        self.load(mixture)
        output = self.trainer.predict(self.datasets[split_name], metric_key_prefix="eval")
        logits = np.asarray(
            output.predictions[0] if isinstance(output.predictions, tuple) else output.predictions
        )
        metrics = {name: float(output.metrics[f"eval_{name}"]) for name in self.spec.metrics}
        predictions = logits[:, 0] if self.spec.regression else logits.argmax(axis=1)
        result = SplitScore(
            metrics,
            float(output.metrics["eval_loss"]),
            len(logits),
            predictions.tolist(),
            logits.astype(np.float32),
        )
        self.evaluations += 1
        self.examples_forwarded += len(logits)
        self.log.append(
            {
                "split": split_name,
                "examples": len(logits),
                "seconds": time.perf_counter() - started,
                "stopped_early": False,
            }
        )
        if self.cache is not None:
            self.cache.put(key, result.to_dict())
        return result

    def value(self, score: SplitScore) -> float:
        if self.selection_metric == SELECTION_LOSS:
            return -score.loss
        value = score.metrics[self.selection_metric]
        return value if self.higher_is_better else -value

    def score_logits(self, logits: np.ndarray, split_name: str) -> SplitScore:
        """Metrics of logits computed elsewhere (a logit ensemble's) through the trainer's own `compute_metrics`,
        and the mean loss the model's head would give them (cross-entropy, or squared error for regression)."""
        return self._metrics_of(logits, self.splits[split_name].labels)

    def _metrics_of(self, logits: np.ndarray, labels: np.ndarray) -> SplitScore:
        from transformers import EvalPrediction

        computed = {}
        if self.trainer.compute_metrics is not None:
            computed = self.trainer.compute_metrics(EvalPrediction(predictions=logits, label_ids=labels))
        metrics = {
            name: float(computed.get(name, computed.get(f"eval_{name}"))) for name in self.spec.metrics
        }
        loss = float(np.mean(per_example_loss(logits, labels, self.spec.regression), dtype=np.float64))
        predictions = logits[:, 0] if self.spec.regression else logits.argmax(axis=1)
        return SplitScore(metrics, loss, len(labels), predictions.tolist(), logits.astype(np.float32))

    def load(self, mixture: Mixture) -> None:
        if self.workbench.loaded != mixture:
            self.workbench.load(mixture)

    def subset_value(self, mixture: Mixture, indices: np.ndarray) -> float:
        """The selection objective on a subset of the selection split (an `auto` confirmation fold), from the
        logits of the mixture's full selection score (cached), through the trainer's own `compute_metrics`."""
        logits = self.score(mixture, "selection").logits[indices]
        return self.value(self._metrics_of(logits, self.splits["selection"].labels[indices]))

    def primary_value(self, score: SplitScore) -> float:
        """The primary metric as "higher is better": `metric_for_best_model` (with `greater_is_better`) when it is
        one of the trainer's metrics, else the first of them (a task metric such as accuracy), else the loss."""
        primary = self.spec.primary_metric
        if primary not in score.metrics:
            return -score.loss
        value = score.metrics[primary]
        return -value if primary == self.selection_metric and not self.higher_is_better else value

    def selection_value(self, mixture: Mixture, must_reach: float | None = None) -> float:
        return self.value(self.score(mixture, "selection"))


# Keys `Trainer.predict` adds to every metrics dict that are not task metrics.
_TRAINER_EXTRAS = {"loss", "runtime", "samples_per_second", "steps_per_second", "model_preparation_time"}
