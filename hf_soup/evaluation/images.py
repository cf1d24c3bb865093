"""Image classification inputs: the base's `AutoImageProcessor`, applied once per split.

Everything after preprocessing is shared with text: labels are mapped to model label ids by name (`scoring`), the
split policy, recipes, card and manifest are the same. Only the inputs differ: `pixel_values` of a fixed shape,
so batches are stacked (no padding) and kept in dataset order.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import numpy as np
import torch
from datasets import Dataset

from ..errors import ConfigError
from ..progress import progress_bar
from .data import check_columns
from .splits import EncodedSplit, label_ids
from .tasks import TaskSpec

logger = logging.getLogger(__name__)

# Splits whose processed pixels fit in this many bytes are processed once and kept; larger ones are processed
# batch by batch each time they are scored (same values, less memory, more CPU).
KEEP_PROCESSED_BYTES = 1 << 30
_CHUNK = 256


class ImageFeatures(Sequence):
    """`features[i]` is `{"pixel_values": tensor}` for example `i`: from memory, or processed on access."""

    def __init__(self, data: Dataset, column: str, processor, name: str, quiet: bool = False):
        self.data, self.column, self.processor = data, column, processor
        first = self._process([0])[0] if len(data) else torch.zeros(0)
        self.kept: torch.Tensor | None = None
        if len(data) * first.numel() * first.element_size() <= KEEP_PROCESSED_BYTES:
            self.kept = torch.empty((len(data), *first.shape), dtype=first.dtype)
            with progress_bar(total=len(data), desc=f"Processing {name}", unit="img", quiet=quiet) as bar:
                for start in range(0, len(data), _CHUNK):
                    stop = min(start + _CHUNK, len(data))
                    self.kept[start:stop] = self._process(range(start, stop))
                    bar.update(stop - start)

    def _process(self, indices) -> torch.Tensor:
        images = self.data[list(indices)][self.column]
        try:
            return self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        except (ValueError, TypeError, OSError) as error:
            raise ConfigError(
                f"The image processor could not read column {self.column!r} ({str(error).splitlines()[0]}); "
                "it must hold images (a datasets Image feature, as imagefolder and parquet exports have)."
            ) from error

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        pixels = self.kept[index] if self.kept is not None else self._process([index])[0]
        return {"pixel_values": pixels}

    def fingerprint(self) -> str:
        """Content hash of the processed pixels when kept; else the dataset's and the processor's identity."""
        digest = hashlib.sha256()
        if self.kept is not None:
            digest.update(memoryview(self.kept.contiguous().view(-1).view(torch.uint8).numpy()))
        else:
            digest.update(f"{self.data._fingerprint}:{self.column}".encode())
        digest.update(self.processor.to_json_string().encode())
        return digest.hexdigest()


def encode_image_split(
    name: str,
    data: Dataset,
    spec: TaskSpec,
    processor,
    *,
    model_labels: list[str] | None,
    num_labels: int,
    quiet: bool = False,
):
    """Process `data`'s images with `processor` and map its labels to model label ids (as `encode_split`)."""
    check_columns(spec, data, name)
    labels, positive = label_ids(spec, data, model_labels, num_labels, name)
    features = ImageFeatures(data, spec.image_column, processor, name, quiet)
    digest = hashlib.sha256(features.fingerprint().encode())
    digest.update(labels.tobytes())
    return EncodedSplit(name, features, labels, np.arange(len(data)), digest.hexdigest(), positive)
