"""A soup of LoRA adapters written as one adapter (`--output-kind lora`), exactly.

Per module, A = [A_1; A_2; ...] and B = [w_1 s_1 B_1, w_2 s_2 B_2, ...] with scale 1, like peft's
`add_weighted_adapter(combination_type="cat")`: B @ A = Σ_i w_i · s_i · B_i A_i, the soup of the merged models'
updates. `--lora-rank r` truncates each module's update to rank r by SVD and reports the relative Frobenius error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..checkpoints.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX
from ..checkpoints.sources import SoupSources
from ..errors import ConfigError
from ..mixture import Mixture
from .materialize import mix_tensor, tensor_sha256, tensor_weights


@dataclass
class LoraOutput:
    """What `write_adapter` wrote: files, tensor hashes, rank, and (with `rank`) the truncation errors."""

    files: list[str]
    tensor_sha256: dict[str, str]
    rank: int
    truncation: dict[str, Any] | None = None


def require_lora_candidates(candidates) -> None:
    """`--output-kind lora` writes one adapter: refuse, before any scoring, a soup with a full-model candidate."""
    full = [c.id for c in candidates if c.kind != "lora"]
    if full:
        raise ConfigError(
            f"--output-kind lora needs every candidate to be a LoRA adapter, but {full[0]} is a full model; use "
            "--output-kind merged (LoRA candidates are then merged into full weights), or leave it out."
        )


def _weights(mixture: Mixture, name: str) -> list[tuple[str, float]]:
    base = mixture.base.id if mixture.base else None
    return [(cid, w) for cid, w in tensor_weights(mixture, name) if cid != base]  # the base adds no update


def soup_update(
    mixture: Mixture, sources: SoupSources, weight: str
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(B, A)` with `B @ A = Σ_i w_i · scale_i · B_i A_i` for one weight: the exact soup update, rank Σ r_i."""
    lora_a, lora_b = [], []
    for cid, w in _weights(mixture, weight):
        adapter = sources.candidates[cid]
        module = adapter.layout.modules.get(weight)
        if module is not None:
            lora_a.append(adapter.adapter.get(module.lora_a).float())
            lora_b.append(adapter.adapter.get(module.lora_b).float() * (w * module.scale))
    if not lora_a:
        return None
    return torch.cat(lora_b, dim=1), torch.cat(lora_a, dim=0)


def truncate(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """The best rank-`rank` factors of `b @ a` (its truncated SVD), with the Frobenius norms of the error and of
    `b @ a`.

    The SVD is taken through QR of the factors (b = Q_b R_b, aᵀ = Q_a R_a, then the SVD of the small
    R_b R_aᵀ), so the full out × in update is never formed.
    """
    q_b, r_b = torch.linalg.qr(b.double())
    q_a, r_a = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    keep = min(rank, len(s))
    error = float(torch.sqrt(torch.sum(s[keep:] ** 2)))
    norm = float(torch.sqrt(torch.sum(s**2)))
    return ((q_b @ u[:, :keep]) * s[:keep]).float(), (vh[:keep] @ q_a.T).float(), error, norm


def write_adapter(
    output: Path, mixture: Mixture, sources: SoupSources, base_id: str, rank: int | None = None
) -> LoraOutput:
    """Write the soup as one LoRA adapter (`adapter_model.safetensors` + `adapter_config.json`) into `output`.

    Modules adapted by only some ingredients get zero rows from the others ("a missing module counts as zero");
    the rank is the largest per-module sum of input ranks, the others zero-padded to it (still exact). The heads
    (`modules_to_save`) are the soup's mixed tensors.
    """
    ingredients = [i.id for i in mixture.ingredients if i.weight or mixture.per_tensor_weights]
    adapters = [sources.candidates[cid] for cid in ingredients]
    weights = sorted({w for source in adapters for w in source.layout.modules})
    saved = sorted({n for source in adapters for n in source.layout.saved})
    updates = {w: u for w in weights if (u := soup_update(mixture, sources, w)) is not None}
    truncation = None
    if rank is not None:
        truncation = {"rank": rank, "modules": {}}
        total_error = total_norm = 0.0
        for weight, (b, a) in updates.items():
            b, a, error, norm = truncate(b, a, rank)
            updates[weight] = (b, a)
            truncation["modules"][weight.removesuffix(".weight")] = error / norm if norm else 0.0
            total_error, total_norm = total_error + error**2, total_norm + norm**2
        truncation["overall"] = math.sqrt(total_error / total_norm) if total_norm else 0.0
    out_rank = max((a.shape[0] for _, a in updates.values()), default=1)
    tensors: dict[str, torch.Tensor] = {}
    for weight, (b, a) in updates.items():
        module = PEFT_PREFIX + weight.removesuffix(".weight")
        pad = out_rank - a.shape[0]
        dtype = next(
            s.adapter.dtype(s.layout.modules[weight].lora_a) for s in adapters if weight in s.layout.modules
        )
        tensors[f"{module}.lora_A.weight"] = torch.nn.functional.pad(a, (0, 0, 0, pad)).to(dtype).contiguous()
        tensors[f"{module}.lora_B.weight"] = torch.nn.functional.pad(b, (0, pad)).to(dtype).contiguous()
    for name in saved:
        mixed, _ = mix_tensor(mixture, sources, name)
        tensors[PEFT_PREFIX + name] = mixed.to(adapters[0].dtype(name)).contiguous()
    save_file(tensors, str(output / ADAPTER_WEIGHTS), metadata={"format": "pt"})

    first = adapters[0].config
    modules_to_save = sorted({m for s in adapters for m in s.config.get("modules_to_save") or []})
    config = {
        **first,
        "r": out_rank,
        "lora_alpha": out_rank,
        "use_rslora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "target_modules": sorted(w.removesuffix(".weight") for w in updates),
        "modules_to_save": modules_to_save or None,
        "base_model_name_or_path": base_id,
        "inference_mode": True,
    }
    (output / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    hashes = {name: tensor_sha256(tensor) for name, tensor in tensors.items()}
    return LoraOutput([ADAPTER_WEIGHTS, ADAPTER_CONFIG], hashes, out_rank, truncation)
