"""Learned soup: mixing weights learned by gradient descent on the selection split (the paper's Section 3.2 /
Appendix "learned soup"), without holding the N models in memory.

Objective: minimise Σ_j L(β·f(x_j; θ(α)), y_j) over α and a temperature β, with θ(α) = Σ_i α_i θ_i, α in the
convex hull (softmax), starting at the uniform soup. The gradient machinery lives with the live model
(`hf_soup/mixing.py`); this recipe declares the options, builds the trainer from the pipeline's context and
keeps the best epoch on the selection split, so it never scores below the uniform soup it starts from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from ..errors import ConfigError
from .base import RecipeContext, RecipeResult, SoupRecipe, Step, option, rank

# One weight per model, or one per tensor (`--granularity`).
Granularity = Literal["model", "layer"]
GRANULARITIES: tuple[str, ...] = get_args(Granularity)

CARD_SECTION = """### Learned mixing weights

{{ details.granularity }}-level weights learned on the selection split (kept from epoch {{ details.kept_epoch }};
epoch 0 is the uniform start), temperature β = {{ '%.4f' % details.temperature }}.
{% if details.granularity == 'model' -%}
| ingredient | α |
|---|---|
{% for cid, a in details.alpha['*'].items() -%}
| `{{ name(cid) }}` | {{ '%.4f' % a }} |
{% endfor %}
{% else -%}
Per-tensor weights are in `soup.json` (`mixture.per_tensor_weights`).
{% endif %}
"""


@dataclass(frozen=True)
class LearnedOptions:
    """How the mixing trainer learns (`hf_soup.scoring.mixing`): the recipe's flags, and the run's seed."""

    granularity: Granularity = "model"
    epochs: int = 3
    lr: float = 0.05
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ConfigError(
                f"--granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}."
            )
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ConfigError("--learn-epochs and --learn-batch-size must be >= 1, and --learn-lr > 0.")


@dataclass(frozen=True)
class LearnedFlags:
    """The learned soup's options (its flags)."""

    granularity: Granularity = option("model", "Learned soup: one weight per model, or per layer (tensor).")
    learn_epochs: int = option(3, "Learned soup: epochs over the selection split.")
    learn_lr: float = option(0.05, "Learned soup: Adam learning rate of the mixing logits.")
    learn_batch_size: int = option(16, "Learned soup: examples per gradient step.")

    def __post_init__(self) -> None:
        self.trainer_options(seed=0)  # refuses bad values

    def trainer_options(self, seed: int) -> LearnedOptions:
        return LearnedOptions(self.granularity, self.learn_epochs, self.learn_lr, self.learn_batch_size, seed)


class LearnedSoup(SoupRecipe):
    """Args:
    trainer (`MixingTrainer`): learns the weights through the live model (`hf_soup.scoring.mixing`).
    """

    Options = LearnedFlags
    card_section = CARD_SECTION

    def __init__(self, trainer):
        self.trainer = trainer

    @classmethod
    def name(cls) -> str:
        return "learned"

    @classmethod
    def pretty_name(cls) -> str:
        return "Learned soup"

    @classmethod
    def from_config(cls, config, context: RecipeContext) -> LearnedSoup:
        if context.mixing_trainer is None:
            raise ConfigError(
                "--recipe learned trains on hf-soup's own encoding of the selection split; with cook(trainer=...) "
                "use greedy, pruned, uniform or wise, or pass the data as dataset= instead of a trainer."
            )
        return cls(context.mixing_trainer(config.options(cls).trainer_options(config.seed)))

    @classmethod
    def label(cls, soup_name: str, details: dict[str, Any] | None) -> str:
        return f"{soup_name} ({details['granularity']} weights, T={details['temperature']:.3f})"

    def cook(self, candidates, individual_scores, objective, revisions=None, tie_break=None) -> RecipeResult:
        ids = rank(candidates, individual_scores, tie_break)
        kept, epochs, state = self.trainer.learn(ids, objective, revisions)
        trajectory = [
            Step(epoch, f"epoch {epoch}" if epoch else "start", None, score, accepted, len(ids))
            for epoch, score, accepted in epochs
        ]
        return RecipeResult(kept, trajectory, state.to_dict())
