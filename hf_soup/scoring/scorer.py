"""Score mixtures on a split: tokenise once, length-sorted batches, dynamic padding, cached results.

What a forward pass keeps per example is the class logits, or for a causal LM the NLL of each predicted token
(`language_modeling.py`); everything else (caching, early rejection, ensembles) works on those arrays.

Labels are mapped to the model's label ids **by name**, so a model whose `id2label` order differs from the
dataset's is still scored correctly. Model labels named generically (`LABEL_k`) follow the dataset's order.
"""

from __future__ import annotations

import base64
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from accelerate import Accelerator

from ..cache import JsonCache, cache_key
from ..errors import ConfigError
from ..evaluation.language_modeling import TokenLosses, document_metrics, outputs_width
from ..evaluation.metrics import compute_metrics, higher_is_better
from ..evaluation.splits import EncodedSplit
from ..evaluation.tasks import TaskSpec
from ..merge.materialize import Workbench
from ..mixture import Mixture
from ..progress import progress_bar
from ..runtime import process_state

logger = logging.getLogger(__name__)


@dataclass
class SplitScore:
    """Metrics of one model or mixture on one split, its mean loss, and per-example predictions and logits.

    The logits are kept (and cached, as float32 bytes) so that ensembles and calibration are computed from the
    forward passes already made for scoring, never from new ones. For a causal LM, `logits` holds each
    document's per-token NLL (`language_modeling.py`) and `predictions` is empty.
    """

    metrics: dict[str, float]
    loss: float
    n: int
    predictions: list = field(default_factory=list, repr=False)
    logits: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        data = {"metrics": self.metrics, "loss": self.loss, "n": self.n, "predictions": self.predictions}
        if self.logits is not None:
            logits = np.ascontiguousarray(self.logits, dtype=np.float32)
            data["logits"] = {"shape": list(logits.shape), "float32": base64.b64encode(logits).decode()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> SplitScore:
        logits = None
        if data.get("logits"):
            raw = base64.b64decode(data["logits"]["float32"])
            logits = np.frombuffer(raw, dtype=np.float32).reshape(data["logits"]["shape"]).copy()
        return cls(data["metrics"], data["loss"], data["n"], data.get("predictions", []), logits)


class _Examples(torch.utils.data.Dataset):
    def __init__(self, split: EncodedSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        return index, self.split.features[index]


def _loader(split: EncodedSplit, collator, batch_size: int):
    """Length-sorted batches of `split`, each with the indices of its examples."""

    def collate(items):
        indices = torch.tensor([index for index, _ in items])
        return {"example_index": indices, **collator([feature for _, feature in items])}

    batches = [split.order[start : start + batch_size].tolist() for start in range(0, len(split), batch_size)]
    return torch.utils.data.DataLoader(
        _Examples(split), batch_sampler=batches, collate_fn=collate, pin_memory=torch.cuda.is_available()
    )  # pinned batches upload to a GPU asynchronously


def class_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """A classifier's forward pass: its logits, in float32."""
    return model(**batch).logits.float()


def model_outputs(spec: TaskSpec, split: EncodedSplit):
    """`(model, batch) -> (batch, k) tensor`: what scoring keeps per example of `split` for the task."""
    return TokenLosses(outputs_width(split)) if spec.causal_lm else class_logits


@torch.inference_mode()
def iter_logits(
    model: torch.nn.Module,
    split: EncodedSplit,
    collator,
    batch_size: int = 64,
    quiet: bool = False,
    outputs=class_logits,
):
    """Yield `(example indices, logits)` batch by batch, longest examples first (`outputs(model, batch)` gives
    the per-example array: class logits by default, `model_outputs` for the task).

    Under `accelerate launch` (or `torchrun`), `accelerator.prepare` shards the batches across processes and each
    step's results are gathered back to every process, so all of them see every logit, in the same order, and
    make the same decisions as a single process would. Batches have different lengths (length-sorted, dynamically
    padded) and the last step may be uneven or repeat early batches to even it out, so results are padded across
    processes, gathered, and de-duplicated by example index: exact, whatever the remainder.
    """
    process_state()
    accelerator = Accelerator()
    model.to(accelerator.device).eval()
    loader = accelerator.prepare_data_loader(_loader(split, collator, batch_size), device_placement=True)
    quiet = quiet or not accelerator.is_main_process
    seen = np.zeros(len(split), dtype=bool)
    with progress_bar(total=len(split), desc=f"Scoring {split.name}", unit="ex", quiet=quiet) as bar:
        for batch in loader:
            indices = batch.pop("example_index")
            logits = outputs(model, batch)
            if accelerator.num_processes > 1:
                indices = accelerator.gather(accelerator.pad_across_processes(indices, pad_index=-1))
                logits = accelerator.gather(accelerator.pad_across_processes(logits))
            indices, logits = indices.cpu().numpy(), logits.cpu().numpy()
            fresh = indices >= 0
            fresh[fresh] = ~seen[indices[fresh]]
            indices, logits = indices[fresh], logits[fresh]
            indices, first = np.unique(indices, return_index=True)  # a repeated example counts once
            logits = logits[first]
            seen[indices] = True
            bar.update(len(indices))
            if len(indices):
                yield indices, logits


def predict(
    model, split: EncodedSplit, collator, batch_size: int = 64, quiet: bool = False, outputs=class_logits
) -> np.ndarray:
    """Logits (or `outputs`) of `model` on `split`, in the split's original order."""
    logits = np.zeros((len(split), 1), dtype=np.float32)
    for index, (indices, batch) in enumerate(iter_logits(model, split, collator, batch_size, quiet, outputs)):
        if index == 0:
            logits = np.zeros((len(split), batch.shape[1]), dtype=np.float32)
        logits[indices] = batch
    return logits


def per_example_loss(logits: np.ndarray, labels: np.ndarray, regression: bool) -> np.ndarray:
    """Cross-entropy per example (squared error for regression); every value is >= 0."""
    if regression:
        return (logits[:, 0] - labels) ** 2
    log_probs = torch.log_softmax(torch.from_numpy(logits), dim=1).numpy()
    return -log_probs[np.arange(len(labels)), labels]


def score_logits(logits: np.ndarray, split: EncodedSplit, spec: TaskSpec) -> SplitScore:
    """Task metrics and mean loss (cross-entropy, MSE for regression, mean token NLL for causal LMs) from logits
    (per-token NLL for causal LMs)."""
    if spec.causal_lm:
        metrics, loss = document_metrics(logits, split.labels)
        return SplitScore(metrics, loss, len(split), [], logits)
    predictions = logits[:, 0] if spec.regression else logits.argmax(axis=1)
    # Summed in float64, as `RejectionBound` sums: early rejection then decides exactly as a full evaluation.
    loss = float(np.mean(per_example_loss(logits, split.labels, spec.regression), dtype=np.float64))
    metrics = compute_metrics(
        spec.metrics, predictions, split.labels, pos_label=split.pos_label, scores=logits
    )
    return SplitScore(metrics, loss, len(split), predictions.tolist(), logits)


SELECTION_LOSS = "loss"


class RejectionBound:
    """Follows a trial's evaluation example by example; says when it provably cannot reach `must_reach`.

    - accuracy (`update` gets 1/0 per example): correct so far + examples remaining < the count needed;
    - loss (`update` gets each example's loss, all >= 0): the running sum already exceeds the allowed total.

    `must_reach` is in "higher is better" units (the negated mean loss for `loss`). The loss is a mean over
    `weight` units: the `n` examples by default, or a causal-LM split's predicted tokens (each document's outcome
    is then its summed token NLL). Stopping never changes the accept/reject decision of a full evaluation; a small
    tolerance errs on the side of evaluating in full.
    """

    def __init__(self, metric: str, n: int, must_reach: float, weight: float | None = None):
        self.metric, self.n, self.seen, self.total = metric, n, 0, 0.0
        if metric == SELECTION_LOSS:
            self.budget = -must_reach * (n if weight is None else weight) * (1 + 1e-9) + 1e-9
        else:
            self.needed = math.ceil(must_reach * n - 1e-9)

    def update(self, outcomes: np.ndarray) -> bool:
        """Add one batch of per-example outcomes; True once the trial is hopeless (and not yet finished)."""
        self.seen += len(outcomes)
        self.total += float(np.sum(outcomes, dtype=np.float64))
        if self.seen >= self.n:
            return False
        if self.metric == SELECTION_LOSS:
            return self.total > self.budget
        return self.total + (self.n - self.seen) < self.needed


def logits_unless_hopeless(batches, split: EncodedSplit, spec: TaskSpec, metric: str, must_reach: float):
    """`(logits, examples seen)` of a trial evaluated batch by batch, or `(None, seen)` as soon as it provably
    cannot reach `must_reach` (see `RejectionBound`).

    Args:
        batches (`Iterable[tuple[np.ndarray, np.ndarray]]`): `(example indices, logits)`, as `iter_logits` yields.
        metric (`str`): `"loss"` or `"accuracy"`, the two metrics with an exact bound.
    """
    n = len(split)
    logits = None
    weight = float(np.sum(split.labels, dtype=np.float64)) if spec.causal_lm else None  # predicted tokens
    bound = RejectionBound(metric, n, must_reach, weight)
    for indices, batch in batches:
        if logits is None:
            logits = np.zeros((n, batch.shape[1]), dtype=np.float32)
        logits[indices] = batch
        labels = split.labels[indices]
        if spec.causal_lm:
            outcomes = np.sum(batch, axis=1, dtype=np.float64)  # each document's summed token NLL
        elif metric == SELECTION_LOSS:
            outcomes = per_example_loss(batch, labels, spec.regression)
        else:
            outcomes = (batch.argmax(axis=1) == labels).astype(np.float64)
        if bound.update(outcomes):
            return None, bound.seen
    return logits, bound.seen


@runtime_checkable
class MixtureScorer(Protocol):
    """What the stages, the recipes' objectives and the reports use of a scorer. hf-soup's own `Scorer` and
    `trainer_scoring.TrainerScorer` both implement it (`tests/test_integrations.py` checks that they do)."""

    spec: Any  # `data.TaskSpec`, or `trainer_scoring.TrainerTask`
    splits: dict[str, EncodedSplit]
    workbench: Workbench
    collator: Any
    selection_metric: str
    head: Any  # a backbone soup's head, or None
    evaluations: int
    examples_forwarded: int
    early_stops: int
    log: list[dict]

    def load(self, mixture: Mixture) -> None:
        """Put `mixture` into the live model."""

    def score(self, mixture: Mixture, split_name: str) -> SplitScore:
        """Metrics, loss and logits of `mixture` on one split (cached)."""

    def value(self, score: SplitScore) -> float:
        """The selection objective of a score, as "higher is better"."""

    def primary_value(self, score: SplitScore) -> float:
        """The task's primary metric, as "higher is better": what "best individual" means."""

    def score_logits(self, logits: np.ndarray, split_name: str) -> SplitScore:
        """Metrics and loss of logits computed elsewhere (an ensemble's)."""

    def subset_value(self, mixture: Mixture, indices: np.ndarray) -> float:
        """The selection objective on a subset of the selection split (an `auto` confirmation fold)."""

    def selection_value(self, mixture: Mixture, must_reach: float | None = None) -> float | None:
        """The selection objective of `mixture`; `None` when it provably cannot reach `must_reach`."""


class Scorer:
    """Scores mixtures on the selection and report splits, through a score cache.

    Args:
        workbench (`Workbench`): the live model that mixtures are loaded into.
        spec (`TaskSpec`): the task.
        splits (`dict[str, EncodedSplit]`): `"selection"` and the report splits, by name.
        fingerprints (`dict[str, str]`): content hashes of each ingredient, for cache keys.
        collator (`DataCollatorWithPadding`): pads batches.
        cache (`JsonCache`, *optional*): the score cache; `None` disables caching.
        selection_metric (`str`, *optional*): `"loss"` or one of the task's metrics; defaults to the primary one.
        early_rejection (`bool`, *optional*, defaults to `True`): stop a trial as soon as it cannot reach the bar.
        variant (`str`, *optional*): what else changes a mixture's scores (BatchNorm recalibration), for cache keys.
        head (*optional*): a backbone soup's head, given to each mixture after it is loaded (`probe.ProbeHead`:
            fitted on the selection split, whose logits it then provides; `probe.CandidateHead`: kept as is).
    """

    def __init__(
        self,
        workbench,
        spec,
        splits,
        fingerprints,
        collator,
        *,
        cache=None,
        batch_size=64,
        quiet=False,
        selection_metric=None,
        early_rejection=True,
        variant="",
        head=None,
    ):
        self.head = head
        self.variant = variant + (f"|{head.describe}" if head is not None else "")
        self.workbench: Workbench = workbench
        self.spec: TaskSpec = spec
        self.splits: dict[str, EncodedSplit] = splits
        self.fingerprints = fingerprints
        self.collator = collator
        self.cache: JsonCache | None = cache
        self.batch_size = batch_size
        self.quiet = quiet
        self.selection_metric = selection_metric or spec.primary_metric
        if self.selection_metric not in (SELECTION_LOSS, *spec.metrics):
            raise ConfigError(
                f"--selection-metric {self.selection_metric!r} is not computed for {spec.name}; choose "
                f"{SELECTION_LOSS} or one of {', '.join(spec.metrics)}."
            )
        self.early_rejection = early_rejection
        self.evaluations = 0
        self.examples_forwarded = 0
        self.early_stops = 0
        self.log: list[dict] = []  # one entry per forward pass over a split (full or stopped early)
        self._memory: dict[str, SplitScore] = {}

    def _key(self, mixture: Mixture, split: EncodedSplit) -> str:
        return cache_key(
            "score",
            mixture.content_key(self.fingerprints),
            split.fingerprint,
            self.spec.metrics,
            self.variant,
        )

    def _cached(self, key: str) -> SplitScore | None:
        if (hit := self._memory.get(key)) is not None:
            return hit
        if self.cache is not None and (stored := self.cache.get(key)) is not None:
            self._memory[key] = SplitScore.from_dict(stored)
            return self._memory[key]
        return None

    def _store(self, key: str, result: SplitScore) -> SplitScore:
        self._memory[key] = result  # within a run, even with --no-cache, nothing is scored twice
        if self.cache is not None:
            self.cache.put(key, result.to_dict())
        return result

    def score(self, mixture: Mixture, split_name: str) -> SplitScore:
        split = self.splits[split_name]
        key = self._key(mixture, split)
        if (hit := self._cached(key)) is not None:
            return hit
        started = time.perf_counter()
        self.load(mixture)
        logits = (
            self.head.selection_logits(self._head_key(mixture))
            if self.head and split_name == "selection"
            else None
        )
        if logits is None:
            logits = predict(
                self.workbench.model,
                split,
                self.collator,
                self.batch_size,
                self.quiet,
                model_outputs(self.spec, split),
            )
        self.evaluations += 1
        self.examples_forwarded += len(split)
        self._record(split_name, len(split), started, early=False)
        return self._store(key, score_logits(logits, split, self.spec))

    def _head_key(self, mixture: Mixture) -> str:
        return mixture.content_key(self.fingerprints)

    def load(self, mixture: Mixture) -> None:
        """Put `mixture` in the live model (and, for a backbone soup, its head)."""
        if self.workbench.loaded != mixture:
            self.workbench.load(mixture)
        if self.head is not None:
            self.head.fit(self._head_key(mixture), self.workbench.model)

    def _record(self, split: str, examples: int, started: float, early: bool) -> None:
        self.log.append(
            {
                "split": split,
                "examples": examples,
                "seconds": time.perf_counter() - started,
                "stopped_early": early,
            }
        )

    def value(self, score: SplitScore) -> float:
        """The selection objective of a score, as "higher is better" (losses are negated)."""
        if self.selection_metric == SELECTION_LOSS:
            return -score.loss
        return higher_is_better(self.selection_metric, score.metrics[self.selection_metric])

    def score_logits(self, logits: np.ndarray, split_name: str) -> SplitScore:
        """Metrics and loss of logits computed elsewhere (a logit ensemble's) on one of the splits."""
        return score_logits(logits, self.splits[split_name], self.spec)

    def subset_value(self, mixture: Mixture, indices: np.ndarray) -> float:
        """The selection objective of `mixture` on a subset of the selection split (a confirmation fold), from
        the logits of its full selection score (cached): no extra forward pass once the mixture is scored."""
        split = self.splits["selection"]
        full = self.score(mixture, "selection")
        part = EncodedSplit(
            f"{split.name}[fold]",
            [],
            split.labels[indices],
            np.arange(len(indices)),
            "",
            pos_label=split.pos_label,
        )
        return self.value(score_logits(full.logits[indices], part, self.spec))

    def primary_value(self, score: SplitScore) -> float:
        """The task's primary metric (accuracy, MCC, Pearson, F1 on rare labels, perplexity...) as "higher is
        better": what "best individual" means."""
        return higher_is_better(self.spec.primary_metric, score.metrics[self.spec.primary_metric])

    def selection_value(self, mixture: Mixture, must_reach: float | None = None) -> float | None:
        """The selection objective of `mixture` (higher is better).

        With `must_reach`, the trial is evaluated batch by batch and abandoned (returning `None`) as soon as it
        can no longer reach `must_reach` even if every remaining example came out perfect. This is exact for
        accuracy (correct so far + remaining < needed) and for loss (every per-example loss is >= 0): the
        accept/reject decision is the same as after a full evaluation.
        """
        split = self.splits["selection"]
        key = self._key(mixture, split)
        if (hit := self._cached(key)) is not None:
            return self.value(hit)
        exact = self.head is None and (  # a probe sees every selection example before any logit exists
            self.selection_metric == SELECTION_LOSS
            or (self.selection_metric == "accuracy" and not self.spec.regression)
        )
        if must_reach is None or not self.early_rejection or not exact:
            return self.value(self.score(mixture, "selection"))
        # A trial stopped early is cached too, with the bar it could not reach: the same trial against the same
        # bar gets the same answer, so a rerun forwards nothing.
        early_key = cache_key("early", key, self.selection_metric, repr(must_reach))
        if self.cache is not None and self.cache.get(early_key) is not None:
            return None
        started = time.perf_counter()
        self.load(mixture)
        batches = iter_logits(
            self.workbench.model, split, self.collator, self.batch_size, True, model_outputs(self.spec, split)
        )
        logits, seen = logits_unless_hopeless(batches, split, self.spec, self.selection_metric, must_reach)
        self.examples_forwarded += seen
        if logits is None:
            self.early_stops += 1
            self._record("selection", seen, started, early=True)
            if self.cache is not None:
                self.cache.put(early_key, {"stopped_early": True, "examples": seen})
            return None
        self._record("selection", seen, started, early=False)
        self.evaluations += 1
        return self.value(self._store(key, score_logits(logits, split, self.spec)))
