"""The report's entries and comparisons, built from scores the `Scorer` already has (or caches).

Each entry holds selection and report scores, the report loss and ECE; ensembles add their inference cost.
Paired comparisons, ties and warnings reuse the predictions of those same forward passes.
"""

from __future__ import annotations

import logging

import numpy as np

from ..evaluation.metrics import METRIC_FUNCTIONS, SCORE_METRICS
from ..evaluation.stats import compare, compare_documents, small_split_warning, topk_hits
from ..mixture import Mixture
from ..results import Comparison, Comparisons, Entry
from ..scoring.ensemble import calibration, ensemble_logits
from ..scoring.scorer import Scorer, SplitScore

logger = logging.getLogger(__name__)


class Summary:
    """Builds report entries for mixtures and ensembles on the selection and report splits.

    Args:
        scorer (`Scorer`): scores mixtures (through its cache).
        singles (`dict[str, Mixture]`): each candidate as a one-ingredient mixture, for ensembles.
    """

    def __init__(self, scorer: Scorer, singles: dict[str, Mixture]):
        self.scorer, self.singles = scorer, singles
        self.report_names = [name for name in scorer.splits if name != "selection"]
        self._ensembles: dict[tuple[tuple[str, ...], str], SplitScore] = {}

    def _entry(self, name: str, ingredients: list[str], scores: dict[str, SplitScore], passes: int) -> Entry:
        spec = self.scorer.spec
        classification = not (spec.regression or spec.causal_lm)
        selection = scores["selection"]
        reports = {split: scores[split] for split in self.report_names}
        return Entry(
            name=name,
            ingredients=ingredients,
            forward_passes=passes,
            selection=selection.metrics,
            selection_loss=selection.loss,
            report={split: score.metrics for split, score in reports.items()},
            report_loss={split: score.loss for split, score in reports.items()},
            ece={
                split: calibration(score, self.scorer.splits[split], classification)
                for split, score in reports.items()
            },
        )

    def entry(self, name: str, mixture: Mixture) -> Entry:
        """A soup's (or one model's) entry: one forward pass per input."""
        scores = {split: self.scorer.score(mixture, split) for split in ["selection", *self.report_names]}
        ingredients = [i.id for i in mixture.ingredients if i.weight != 0] or mixture.ids()
        return self._entry(name, ingredients, scores, passes=1)

    def ensemble(self, name: str, ids: list[str]) -> Entry:
        """The logit ensemble of `ids`: the mean of their logits, from their cached scores (N forward passes)."""
        scores = {split: self._ensemble_score(ids, split) for split in ["selection", *self.report_names]}
        return self._entry(name, list(ids), scores, passes=len(ids))

    def _ensemble_score(self, ids: list[str], split: str) -> SplitScore:
        """Computed once per (members, split): the table row and the paired comparison share it."""
        key = (tuple(ids), split)
        if key not in self._ensembles:
            members = [self.scorer.score(self.singles[cid], split) for cid in ids]
            # Scored by the scorer's own metrics (a Trainer's `compute_metrics`, or hf-soup's), like any model.
            outputs = ensemble_logits(members, self.scorer.spec.causal_lm)
            self._ensembles[key] = self.scorer.score_logits(outputs, split)
        return self._ensembles[key]

    def comparisons(
        self, best: Mixture, others: dict[str, Mixture | list[str]], resamples: int, seed: int
    ) -> Comparisons:
        """Paired differences vs the best individual on each report split, from the predictions already made.

        `others` maps a name to a mixture, or to a list of candidate ids for a logit ensemble.
        """
        out: dict[str, dict] = {}
        for split in self.report_names:
            encoded, reference = self.scorer.splits[split], self.scorer.score(best, split)
            out[split] = {}
            metrics = self.scorer.spec.metrics
            for name, other in others.items():
                score = (
                    self._ensemble_score(other, split)
                    if isinstance(other, list)
                    else self.scorer.score(other, split)
                )
                if self.scorer.spec.causal_lm:  # documents resampled in pairs; NLL and perplexity per token
                    out[split][name] = {
                        metric: Comparison.from_dict(r)
                        for metric, r in compare_documents(
                            encoded.labels,
                            score.logits.sum(axis=1, dtype=np.float64),
                            reference.logits.sum(axis=1, dtype=np.float64),
                            resamples=resamples,
                            seed=seed,
                        ).items()
                    }
                    continue
                out[split][name] = compare(
                    bootstrappable(metrics, encoded.labels),
                    encoded.labels,
                    np.asarray(score.predictions),
                    np.asarray(reference.predictions),
                    resamples=resamples,
                    seed=seed,
                    pos_label=encoded.pos_label,
                )
                for metric in (m for m in metrics if m in SCORE_METRICS):
                    # Top-k accuracy is the accuracy of per-example hits: bootstrap those, paired as the rest.
                    hits = [
                        topk_hits(s.logits, encoded.labels, SCORE_METRICS[metric]) for s in (score, reference)
                    ]
                    ones = np.ones(len(encoded.labels), dtype=np.int64)
                    out[split][name][metric] = compare(
                        ("accuracy",), ones, *hits, resamples=resamples, seed=seed
                    )["accuracy"]
                out[split][name] = {metric: Comparison.from_dict(r) for metric, r in out[split][name].items()}
        return out

    def warnings(self, ids: list[str]) -> list[str]:
        warnings = []
        if "accuracy" in self.scorer.spec.metrics:
            scores = [self.scorer.score(self.singles[c], "selection").metrics["accuracy"] for c in ids]
            message = small_split_warning(scores, len(self.scorer.splits["selection"]))
            if message:
                logger.warning(message)
                warnings.append(message)
        return warnings


def bootstrappable(metrics: tuple[str, ...], labels: np.ndarray) -> tuple[str, ...]:
    """The metrics whose paired interval hf-soup can recompute from predictions: its own, not a Trainer's
    `compute_metrics` names it does not know (`precision`, `auc`, ...), and F1 only for binary labels (a
    multiclass F1 could be averaged in any way). The others are reported and ranked, without an interval."""
    binary = len(np.unique(labels)) <= 2
    return tuple(m for m in metrics if m in METRIC_FUNCTIONS and (m != "f1" or binary))


def ties(
    ranked: list[str], individual: dict[str, float], losses: dict[str, float], metric: str = "selection"
) -> list[dict]:
    """Groups of candidates with the same selection score (in `metric`), in the order the tie was broken."""
    groups: dict[float, list[str]] = {}
    for cid in ranked:
        groups.setdefault(individual[cid], []).append(cid)
    return [
        {
            "metric": metric,
            "score": -score if metric == "loss" else score,  # losses rank negated
            "candidates": members,
            "losses": [losses[c] for c in members],
            "broken_by": "selection loss, then candidate id",
        }
        for score, members in groups.items()
        if len(members) > 1
    ]
