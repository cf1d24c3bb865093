"""One way to write a mixture's weights, shared by `output` (a new soup folder) and `reproduce` (a rebuild).

`kind` is the soup's output kind: `"merged"` writes full safetensors weights (streamed, tensor by tensor, with
float32 accumulation); `"lora"` writes one exact LoRA adapter of LoRA candidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..checkpoints.sources import SoupSources
from ..mixture import Mixture
from .adapter import require_lora_candidates, write_adapter
from .materialize import materialize

OutputKind = Literal["merged", "lora"]


@dataclass(frozen=True)
class WeightSettings:
    """How to write the weights: the output dtype and shard size (merged), or the adapter's base and rank."""

    dtype: torch.dtype | None = None
    max_shard_size: str | int = "5GB"
    base_id: str = ""  # the adapter's `base_model_name_or_path`
    lora_rank: int | None = None


@dataclass
class WrittenWeights:
    files: list[str]
    tensor_sha256: dict[str, str]
    lora: dict[str, Any] | None = None  # the adapter's rank and truncation errors


def write(
    mixture: Mixture,
    sources: SoupSources,
    kind: OutputKind,
    folder: Path,
    *,
    settings: WeightSettings = WeightSettings(),
    candidates=None,
    quiet: bool = False,
    overrides: dict[str, torch.Tensor] | None = None,
    observe=None,
) -> WrittenWeights:
    """Write `mixture`'s weights into the existing `folder` as `kind`; return the files and tensor hashes.

    Args:
        candidates (`list[Candidate]`, *optional*): with `kind="lora"`, checked to all be LoRA adapters first.
        overrides (`dict[str, torch.Tensor]`, *optional*): merged weights written as given instead of mixed
            (BatchNorm statistics re-estimated on data).
        observe (`Callable`, *optional*): with `kind="merged"`, sees each tensor's reads before it is mixed
            (`materialize`'s argument).
    """
    if kind == "lora":
        if candidates is not None:
            require_lora_candidates(candidates)
        stats = write_adapter(folder, mixture, sources, settings.base_id, settings.lora_rank)
        return WrittenWeights(
            stats.files, stats.tensor_sha256, {"rank": stats.rank, "truncation": stats.truncation}
        )
    stats = materialize(
        mixture,
        sources,
        folder,
        dtype=settings.dtype,
        max_shard_size=settings.max_shard_size,
        quiet=quiet,
        overrides=overrides,
        observe=observe,
    )
    return WrittenWeights(stats.files, stats.tensor_sha256)
