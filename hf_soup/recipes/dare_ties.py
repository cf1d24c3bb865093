"""DARE-TIES (Yu et al. 2023, arXiv 2311.03099, with TIES' sign election): drop each task-vector entry with
probability 1 − `density`, rescale by 1/`density`, then merge the entries that agree with the elected sign.
Seeded by `--seed`. mergekit's `dare_ties`."""

from __future__ import annotations

from .dare_linear import DARE_PAPER, DARE_TITLE
from .task_vectors import SparseOptions, TaskVectorRecipe, card_section


class DareTiesSoup(TaskVectorRecipe):
    method = "dare_ties"
    Options = SparseOptions
    uses_density = True
    card_section = card_section(
        "DARE-TIES",
        "Each entry of each task vector τ_i = θ_i − θ_base is kept with probability density and rescaled by "
        "1/density; each entry's sign is elected by the sign of Σ w_i τ̃_i, and only the agreeing entries are "
        "merged: θ = θ_base + λ·Σ m_i w_i τ̃_i{% if details.normalize %} / Σ m_i w_i{% endif %}.",
    )

    @classmethod
    def pretty_name(cls) -> str:
        return "DARE-TIES"

    @classmethod
    def reference_url(cls) -> str:
        return DARE_PAPER

    @classmethod
    def reference_title(cls) -> str:
        return DARE_TITLE
