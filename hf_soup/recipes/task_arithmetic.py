"""Task arithmetic (Ilharco et al. 2023, arXiv 2212.04089): add the weighted task vectors to the base,
θ = θ_base + λ·Σ w_i (θ_i − θ_base); with `--normalize`, divided by Σ w_i. mergekit's `task_arithmetic`."""

from __future__ import annotations

from .task_vectors import TaskVectorRecipe, card_section


class TaskArithmeticSoup(TaskVectorRecipe):
    method = "task_arithmetic"
    card_section = card_section(
        "Task arithmetic",
        "θ = θ_base + λ·Σ w_i (θ_i − θ_base){% if details.normalize %} / Σ w_i{% endif %}, tensor by tensor in float32.",
    )

    @classmethod
    def pretty_name(cls) -> str:
        return "Task arithmetic"

    @classmethod
    def reference_url(cls) -> str:
        return "https://arxiv.org/abs/2212.04089"

    @classmethod
    def reference_title(cls) -> str:
        return "Ilharco et al. 2023, *Editing models with task arithmetic*"
