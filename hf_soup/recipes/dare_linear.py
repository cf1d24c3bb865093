"""DARE, combined linearly (Yu et al. 2023, arXiv 2311.03099): drop each task-vector entry with probability
1 − `density`, rescale the kept ones by 1/`density`, and add the weighted sum to the base. Seeded by `--seed`.
mergekit's `dare_linear` (which rescales to keep the L1 norm rather than by 1/density)."""

from __future__ import annotations

from .task_vectors import SparseOptions, TaskVectorRecipe, card_section

DARE_PAPER = "https://arxiv.org/abs/2311.03099"
DARE_TITLE = "Yu et al. 2023, *Language models are Super Mario* (DARE)"


class DareLinearSoup(TaskVectorRecipe):
    method = "dare_linear"
    Options = SparseOptions
    uses_density = True
    card_section = card_section(
        "DARE (linear)",
        "Each entry of each task vector τ_i = θ_i − θ_base is kept with probability density and rescaled by "
        "1/density; θ = θ_base + λ·Σ w_i τ̃_i{% if details.normalize %} / Σ w_i{% endif %}.",
    )

    @classmethod
    def pretty_name(cls) -> str:
        return "DARE (linear)"

    @classmethod
    def reference_url(cls) -> str:
        return DARE_PAPER

    @classmethod
    def reference_title(cls) -> str:
        return DARE_TITLE
