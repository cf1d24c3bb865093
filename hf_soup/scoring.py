"""Score mixtures on a split: tokenise once, length-sorted batches, dynamic padding, cached results.

Labels are mapped to the model's label ids **by name**, so a model whose `id2label` order differs from the
dataset's is still scored correctly. Model labels named generically (`LABEL_k`) follow the dataset's order.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from accelerate import PartialState
from datasets import Dataset
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from .cache import JsonCache, cache_key
from .data import TaskSpec, check_columns, dataset_label_names
from .errors import DatasetError
from .materialize import Workbench
from .metrics import compute_metrics
from .mixture import Mixture
from .progress import progress_bar

logger = logging.getLogger(__name__)


@dataclass
class EncodedSplit:
    """One split, tokenised once, with labels as model label ids (or floats for regression)."""

    name: str
    features: list[dict[str, list[int]]]
    labels: np.ndarray
    order: np.ndarray  # example indices from longest to shortest
    fingerprint: str
    pos_label: int = 1

    def __len__(self) -> int:
        return len(self.labels)


def _label_ids(spec: TaskSpec, data: Dataset, model_labels: list[str] | None, num_labels: int, split: str):
    raw = list(data[spec.label_column])
    if spec.regression:
        return np.asarray(raw, dtype=np.float32), 1
    names = dataset_label_names(data, spec.label_column)
    values = [names[v] if isinstance(v, (int, np.integer)) and names else v for v in raw]
    if model_labels is not None and names is not None:
        index = {name: i for i, name in enumerate(model_labels)}
        unknown = sorted({str(v) for v in values if v not in index})
        if unknown:
            raise DatasetError(
                f"The {split} split has labels the models do not know: {', '.join(unknown)} (the models know "
                f"{', '.join(model_labels)}). Check --label-column, or soup models trained on this label set."
            )
        ids = np.asarray([index[v] for v in values], dtype=np.int64)
        positive = index.get(names[1], 1) if len(names) == 2 else 1
        return ids, positive
    if names is not None and not all(isinstance(v, (int, np.integer)) for v in raw):
        # Generic model labels and string dataset labels: trust the sorted order.
        index = {name: i for i, name in enumerate(names)}
        ids = np.asarray([index[v] for v in values], dtype=np.int64)
    else:
        ids = np.asarray(raw, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= num_labels):
        raise DatasetError(
            f"The {split} split has label ids outside 0..{num_labels - 1} (e.g. {ids.min()}); GLUE test splits "
            "have no labels (-1): report on `validation` instead."
        )
    return ids, 1


def encode_split(
    name: str,
    data: Dataset,
    spec: TaskSpec,
    tokenizer: PreTrainedTokenizerBase,
    model_labels: list[str] | None,
    num_labels: int,
    max_length: int = 128,
) -> EncodedSplit:
    """Tokenise `data` once and map its labels to model label ids."""
    check_columns(spec, data, name)
    labels, positive = _label_ids(spec, data, model_labels, num_labels, name)
    texts = [text or "" for text in data[spec.text_column]]
    pairs = [text or "" for text in data[spec.text_pair_column]] if spec.text_pair_column else None
    encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    features = [{k: encoded[k][i] for k in keys} for i in range(len(texts))]
    lengths = np.asarray([len(f["input_ids"]) for f in features])
    digest = hashlib.sha256()
    for feature in features:
        digest.update(np.asarray(feature["input_ids"], dtype=np.int64).tobytes())
    digest.update(labels.tobytes())
    return EncodedSplit(
        name, features, labels, np.argsort(-lengths, kind="stable"), digest.hexdigest(), positive
    )


@dataclass
class SplitScore:
    """Metrics of one model or mixture on one split, plus its mean loss and per-example predictions."""

    metrics: dict[str, float]
    loss: float
    n: int
    predictions: list = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {"metrics": self.metrics, "loss": self.loss, "n": self.n, "predictions": self.predictions}

    @classmethod
    def from_dict(cls, data: dict) -> SplitScore:
        return cls(data["metrics"], data["loss"], data["n"], data.get("predictions", []))


@torch.inference_mode()
def predict(
    model: torch.nn.Module,
    split: EncodedSplit,
    collator: DataCollatorWithPadding,
    batch_size: int = 64,
    quiet: bool = False,
) -> np.ndarray:
    """Logits of `model` on `split`, in the split's original order."""
    device = PartialState().device
    model.to(device).eval()
    outputs: list[np.ndarray] = []
    with progress_bar(total=len(split), desc=f"Scoring {split.name}", unit="ex", quiet=quiet) as bar:
        for start in range(0, len(split), batch_size):
            indices = split.order[start : start + batch_size]
            batch = collator([split.features[i] for i in indices])
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            outputs.append(logits.float().cpu().numpy())
            bar.update(len(indices))
    logits = np.concatenate(outputs) if outputs else np.zeros((0, 1), dtype=np.float32)
    unsorted = np.empty_like(logits)
    unsorted[split.order] = logits
    return unsorted


def score_logits(logits: np.ndarray, split: EncodedSplit, spec: TaskSpec) -> SplitScore:
    """Task metrics and mean loss (cross-entropy, or MSE for regression) from logits."""
    if spec.regression:
        predictions = logits[:, 0]
        loss = float(np.mean((predictions - split.labels) ** 2))
    else:
        predictions = logits.argmax(axis=1)
        log_probs = torch.log_softmax(torch.from_numpy(logits), dim=1).numpy()
        loss = float(-np.mean(log_probs[np.arange(len(split)), split.labels]))
    metrics = compute_metrics(spec.metrics, predictions, split.labels, pos_label=split.pos_label)
    return SplitScore(metrics, loss, len(split), predictions.tolist())


class Scorer:
    """Scores mixtures on the selection and report splits, through a score cache.

    Args:
        workbench (`Workbench`): the live model that mixtures are loaded into.
        spec (`TaskSpec`): the task.
        splits (`dict[str, EncodedSplit]`): `"selection"` and the report splits, by name.
        fingerprints (`dict[str, str]`): content hashes of each ingredient, for cache keys.
        collator (`DataCollatorWithPadding`): pads batches.
        cache (`JsonCache`, *optional*): the score cache; `None` disables caching.
    """

    def __init__(
        self, workbench, spec, splits, fingerprints, collator, cache=None, batch_size=64, quiet=False
    ):
        self.workbench: Workbench = workbench
        self.spec: TaskSpec = spec
        self.splits: dict[str, EncodedSplit] = splits
        self.fingerprints = fingerprints
        self.collator = collator
        self.cache: JsonCache | None = cache
        self.batch_size = batch_size
        self.quiet = quiet
        self.evaluations = 0

    def score(self, mixture: Mixture, split_name: str) -> SplitScore:
        split = self.splits[split_name]
        key = cache_key("score", mixture.content_key(self.fingerprints), split.fingerprint, self.spec.metrics)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            return SplitScore.from_dict(hit)
        if self.workbench.loaded != mixture:
            self.workbench.load(mixture)
        logits = predict(self.workbench.model, split, self.collator, self.batch_size, self.quiet)
        self.evaluations += 1
        result = score_logits(logits, split, self.spec)
        if self.cache is not None:
            self.cache.put(key, result.to_dict())
        return result

    def selection_value(self, mixture: Mixture) -> float:
        """The selection objective (the task's primary metric; higher is better)."""
        return self.score(mixture, "selection").metrics[self.spec.primary_metric]
