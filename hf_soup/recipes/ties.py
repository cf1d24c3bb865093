"""TIES-Merging (Yadav et al. 2023, arXiv 2306.01708): trim each task vector to its top-`density` magnitudes,
elect a sign per entry by the sign of the weighted sum, and merge only the entries that agree with it:
θ = θ_base + λ·Σ m_i w_i τ̂_i / Σ m_i w_i (normalised by default). mergekit's `ties`."""

from __future__ import annotations

from .task_vectors import SparseOptions, TaskVectorRecipe, card_section


class TiesSoup(TaskVectorRecipe):
    method = "ties"
    Options = SparseOptions
    default_normalize = True
    uses_density = True
    card_section = card_section(
        "TIES-Merging",
        "Each task vector τ_i = θ_i − θ_base keeps its top-density entries by magnitude; each entry's sign is elected "
        "by the sign of Σ w_i τ̂_i, and only the agreeing entries are merged: θ = θ_base + λ·Σ m_i w_i τ̂_i"
        "{% if details.normalize %} / Σ m_i w_i{% endif %}.",
    )

    @classmethod
    def pretty_name(cls) -> str:
        return "TIES-Merging"

    @classmethod
    def reference_url(cls) -> str:
        return "https://arxiv.org/abs/2306.01708"

    @classmethod
    def reference_title(cls) -> str:
        return "Yadav et al. 2023, *TIES-Merging*"
