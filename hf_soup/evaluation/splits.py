"""The encoded split: one split of the task's data, encoded once for the models (text or images), with its labels
as the models' label ids. Text encoding (`text.py`) and image encoding (`images.py`) both produce it."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from datasets import Dataset

from ..errors import DatasetError
from .data import dataset_label_names
from .tasks import TaskSpec


@dataclass
class EncodedSplit:
    """One split, tokenised once, with labels as model label ids (or floats for regression)."""

    name: str
    features: Sequence[dict]  # token ids per example (text) or `ImageFeatures` (pixel values, images)
    labels: np.ndarray
    order: np.ndarray  # example indices from longest to shortest
    fingerprint: str
    pos_label: int = 1
    empty_inputs: int = 0  # examples whose text (or one of a pair) is missing or blank
    truncated: int = 0  # causal LM: documents cut to --max-length tokens

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray, name: str) -> EncodedSplit:
        """These examples only (in the order given), still batched longest first."""
        position = {int(i): p for p, i in enumerate(indices)}
        order = np.asarray([position[int(i)] for i in self.order if int(i) in position], dtype=np.int64)
        digest = hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]
        return replace(
            self,
            name=name,
            features=[self.features[int(i)] for i in indices],
            labels=self.labels[np.asarray(indices)],
            order=order,
            fingerprint=f"{self.fingerprint}/{digest}",
        )


def label_ids(spec: TaskSpec, data: Dataset, model_labels: list[str] | None, num_labels: int, split: str):
    raw = list(data[spec.label_column])
    if spec.regression:
        return np.asarray(raw, dtype=np.float32), 1
    fractional = [v for v in raw if isinstance(v, (float, np.floating)) and not float(v).is_integer()]
    if fractional:
        raise DatasetError(
            f"The {split} split's label column {spec.label_column!r} holds numbers that are not class ids (e.g. "
            f"{', '.join(f'{v:g}' for v in fractional[:3])}). For a regression task pass --regression (candidates "
            "with num_labels=1); for classification, use integer ids or label names."
        )
    raw = [int(v) if isinstance(v, (float, np.floating)) else v for v in raw]
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
