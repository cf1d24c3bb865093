"""`SoupConfig`: every option of a soup run, declared once. The CLI flags are generated from it; each recipe's own
options are declared by the recipe (`Options`) and held here in `recipe_options`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .candidates.compat import SoupKind
from .candidates.hub import check_repo_id
from .checkpoints.vocab import VocabMode
from .errors import ConfigError
from .evaluation.tasks import (
    CAUSAL_LM_TASK,
    GLUE_TASKS,
    IMAGE_TASK,
    check_selection_fraction,
    check_task_options,
    is_causal_lm_task,
    is_image_task,
)
from .merge.writer import OutputKind
from .recipes import RECIPES, SoupRecipe, option_owners, recipe_class, recipe_options

# The dtype of the written soup ("auto": the candidates' common dtype).
SoupDtype = Literal["auto", "float32", "bfloat16", "float16"]

# The recipes that soup backbones: each trial's body gets a head of its own (`probe.py`), so recipes that learn
# weights or interpolate with the base's head do not apply.
BACKBONE_RECIPES = ("uniform", "greedy", "pruned", "task_arithmetic", "ties", "dare_linear", "dare_ties")


def _opt(help: str, **cli) -> dict:
    return {"help": help, **cli}


@dataclass(frozen=True)
class SoupConfig:
    """The options of one soup run. `hf-soup cook --help` lists the same fields as flags.

    Example:
    ```python
    >>> config = SoupConfig(base="./minilm", candidates=["./runs/*"], dataset="reviews.csv",
    ...                     text_column="review", label_column="score", recipe="greedy", output="./soup")
    ```
    """

    base: str = field(
        metadata=_opt("The pretrained model every candidate was fine-tuned from (a folder).", required=True)
    )
    candidates: list[str] = field(
        metadata=_opt(
            "Candidate folders or globs, e.g. './runs/*' or 'out/checkpoint-*'.", required=True, nargs="+"
        )
    )
    task: str | None = field(
        default=None,
        metadata=_opt(
            f"A GLUE task, glue/<{'|'.join(GLUE_TASKS)}>, {IMAGE_TASK} or {CAUSAL_LM_TASK} (with --dataset; "
            f"{CAUSAL_LM_TASK} selects by held-out mean token NLL and reports perplexity).",
            metavar="TASK",
        ),
    )
    dataset: str | None = field(
        default=None,
        metadata=_opt("A local CSV/JSON/parquet file or folder, or a Hub dataset id.", metavar="PATH_OR_ID"),
    )
    text_column: str | None = field(default=None, metadata=_opt("The text column of --dataset."))
    text_pair_column: str | None = field(default=None, metadata=_opt("The second text column, for pairs."))
    label_column: str | None = field(
        default=None, metadata=_opt("The label column of --dataset (image-classification: 'label').")
    )
    regression: bool = field(
        default=False,
        metadata=_opt(
            "--dataset's label column holds numbers to predict (candidates with num_labels=1): select on mean "
            "squared error, report Pearson and Spearman."
        ),
    )
    image_column: str | None = field(
        default=None, metadata=_opt("image-classification: the image column of --dataset (default: 'image').")
    )
    recalibrate_bn: int = field(
        default=0,
        metadata=_opt(
            "For models with BatchNorm: after averaging, re-estimate the running statistics on N selection "
            "batches (every scored mixture and the written soup). 0: keep the averaged statistics.",
            metavar="N",
        ),
    )
    output_kind: OutputKind = field(
        default="merged",
        metadata=_opt(
            "LoRA candidates: write the full merged model, or a LoRA adapter (exact: its rank is the sum of the "
            "input ranks, unless --lora-rank)."
        ),
    )
    lora_rank: int | None = field(
        default=None,
        metadata=_opt(
            "With --output-kind lora: truncate each module's soup update to this rank by SVD; the relative "
            "Frobenius error is reported per module and overall.",
            metavar="R",
        ),
    )
    # The registry itself: a recipe registered there is a valid --recipe.
    recipe: str = field(default="greedy", metadata=_opt("How to choose ingredients.", choices=RECIPES))
    recipe_options: dict[str, Any] = field(
        default_factory=dict,
        metadata=_opt(
            "The recipe's own options by name, e.g. {'alpha': '0.5'} for wise (each is a flag: see the recipe "
            "options in `hf-soup cook --help`).",
            cli=False,
        ),
    )
    selection_metric: str | None = field(
        # Loss by default: on two real sweeps, greedy by loss beat greedy by accuracy on held-out data (README).
        default="loss",
        metadata=_opt(
            "What ranks candidates and accepts trials on the selection split: 'loss' (mean cross-entropy; MSE for "
            "regression; mean token NLL for causal-lm), 'accuracy', or any metric the task computes ('f1', "
            "'matthews_correlation', 'pearson', 'perplexity').",
            metavar="METRIC",
        ),
    )
    positive_label: str | None = field(
        default=None,
        metadata=_opt(
            "Custom binary labels: the label F1 treats as positive (default: the selection split's rarer one).",
            metavar="LABEL",
        ),
    )
    extra_metrics: tuple[str, ...] = field(
        default=(),
        metadata=_opt(
            "Custom data: report these metrics too, e.g. matthews_correlation (accuracy and F1 are always there).",
            nargs="+",
            choices=("matthews_correlation",),
            metavar="METRIC",
        ),
    )
    no_early_rejection: bool = field(
        default=False,
        metadata=_opt(
            "Evaluate every trial in full, even once it provably cannot be accepted (same result, slower)."
        ),
    )
    selection_split: str | None = field(
        default=None,
        metadata=_opt(
            "Split that chooses the soup: a split expression ('validation', 'train[:10%%]') or a data file. "
            "Default: a seeded carve-out of train.",
            metavar="SPEC",
        ),
    )
    report_split: str | None = field(
        default=None,
        metadata=_opt(
            "Split the reported numbers come from: a split expression or a data file. "
            "Default: GLUE validation (both for MNLI), else the dataset's test or validation split.",
            metavar="SPEC",
        ),
    )
    selection_fraction: float = field(
        default=0.1, metadata=_opt("Fraction of train carved out as the selection split.", metavar="F")
    )
    seed: int = field(default=0, metadata=_opt("Seed of the selection carve-out and subsampling."))
    max_eval_examples: int | None = field(
        default=None,
        metadata=_opt("Evaluate on at most N examples per split (seeded subsample).", metavar="N"),
    )
    bootstrap: int = field(
        default=1000, metadata=_opt("Paired bootstrap resamples for the report-split intervals.", metavar="N")
    )
    max_length: int = field(
        default=128,
        metadata=_opt(
            "Truncate inputs to this many tokens (causal-lm: longer documents are truncated, not packed, and the "
            "report counts them)."
        ),
    )
    batch_size: int = field(default=64, metadata=_opt("Evaluation batch size."))
    output: str | None = field(default=None, metadata=_opt("Where to write the soup folder.", metavar="DIR"))
    overwrite: bool = field(
        default=False,
        metadata=_opt("Replace an existing --output folder, or other files in the --push-to repo."),
    )
    push_to: str | None = field(
        default=None,
        metadata=_opt("Push the soup to this Hub repo as one commit (needs HF_TOKEN).", metavar="ORG/NAME"),
    )
    private: bool = field(default=False, metadata=_opt("Create the --push-to repo as private."))
    strict: bool = field(
        default=False,
        metadata=_opt(
            "Fail if any candidate is rejected, or does not look fine-tuned from --base (before any scoring)."
        ),
    )
    include_flagged: bool = field(
        default=False,
        metadata=_opt(
            "Let candidates that do not look fine-tuned from --base into the soup (by default they are scored and "
            "shown, but kept out: models from another initialisation average to garbage)."
        ),
    )
    allow_pickle: bool = field(
        default=False,
        metadata=_opt(
            "Accept .bin weights, loaded with torch.load(weights_only=True). Safetensors is preferred."
        ),
    )
    trust_remote_code: bool = field(
        default=False,
        metadata=_opt(
            "Accept models whose config maps to custom code (auto_map), and run that code when loading them. "
            "Off by default: read the code first."
        ),
    )
    vocab: VocabMode = field(
        default="base",
        metadata=_opt(
            "When candidates' embedding rows differ from the base's (added tokens, a vocabulary padded to a "
            "multiple of 64), rows are matched by token string. base: the soup keeps the base's vocabulary (rows "
            "of tokens it lacks are dropped, with a warning); union: added tokens are kept, each row averaged over "
            "the candidates that have it, and the tokenizer gets them."
        ),
    )
    soup: SoupKind = field(
        default="full",
        metadata=_opt(
            "full: every tensor is souped (candidates of one task and label set). backbone: candidates may come "
            "from different tasks and label sets; only the tensors the base has (the shared body) are souped, and "
            "--head builds the target task's head (the paper's cross-dataset soups, section 3.5). Recipes: "
            f"{', '.join(BACKBONE_RECIPES)}."
        ),
    )
    head: str = field(
        default="probe",
        metadata=_opt(
            "--soup backbone: the target task's head. probe: a logistic regression (scikit-learn, L2, C=1, lbfgs) "
            "fitted on the selection split's frozen features of each souped body; or the id of a candidate trained "
            "on the target task, whose head is kept.",
            metavar="probe|CANDIDATE",
        ),
    )
    stream: bool = field(
        default=False,
        metadata=_opt(
            "Read Hub candidates and a Hub base tensor by tensor with HTTP Range requests instead of downloading "
            "their weights: disk holds the soup alone. Data-free recipes only (scoring re-reads every candidate "
            "on each trial)."
        ),
    )
    dtype: SoupDtype = field(
        default="auto",
        metadata=_opt(
            "Dtype of the written soup, which is also the dtype it is scored in. auto: the candidates' common "
            "dtype (float32 when they differ)."
        ),
    )
    max_shard_size: str = field(
        default="5GB", metadata=_opt("Largest safetensors shard of the output (5GB: the Hub's convention).")
    )
    no_cache: bool = field(default=False, metadata=_opt("Neither read nor write the score cache."))
    cache_dir: str | None = field(
        default=None,
        metadata=_opt("Score cache folder (default: $HF_SOUP_CACHE or $HF_HOME/hf_soup).", metavar="DIR"),
    )

    scored_by_trainer: bool = field(
        default=False,
        metadata=_opt(
            "Set by cook(trainer=...): the trainer supplies data and metrics (not recorded in soup.json).",
            cli=False,
        ),
    )

    def __post_init__(self) -> None:
        recipe = recipe_class(self.recipe)  # refuses an unknown name
        if self.task or self.dataset:
            check_task_options(self.task, self.dataset, self.text_column, self.label_column)
        if self.recalibrate_bn < 0:
            raise ConfigError(f"--recalibrate-bn takes a number of batches >= 0, got {self.recalibrate_bn}.")
        if self.lora_rank is not None and (self.output_kind != "lora" or self.lora_rank < 1):
            raise ConfigError("--lora-rank R (R >= 1) only applies with --output-kind lora.")
        if not self.scored and recipe.needs_data:
            data_free = ", ".join(name for name, known in RECIPES.items() if not known.needs_data)
            raise ConfigError(
                f"--recipe {self.recipe} scores candidates: give --task glue/<name> or --dataset. "
                f"Without data, only data-free recipes run ({data_free}; uniform is a plain merge)."
            )
        check_selection_fraction(self.selection_fraction)
        if self.push_to:
            check_repo_id(self.push_to)
        recipe_options(self.recipe, self.recipe_options)  # the recipes' own options: known, used, valid
        if self.stream and self.scored:
            raise ConfigError(
                "--stream reads each Hub checkpoint over HTTP as the soup needs it, which suits data-free recipes; "
                "a scored recipe reads every candidate again on each trial. Drop --stream (the candidates are "
                "then downloaded once), or drop the data for a data-free soup."
            )
        self._check_backbone()
        if isinstance(self.candidates, str):
            object.__setattr__(self, "candidates", [self.candidates])

    def _check_backbone(self) -> None:
        if self.soup != "backbone":
            if self.head != "probe":
                raise ConfigError(
                    "--head builds the target task's head of a backbone soup: add --soup backbone."
                )
            return
        problems = {
            "needs the target task's data (--task or --dataset): its head is built on the selection split": not (
                self.task or self.dataset
            ),
            "scores with hf-soup's own data pipeline, not a Trainer's": self.scored_by_trainer,
            f"runs the recipes {', '.join(BACKBONE_RECIPES)}": self.recipe not in BACKBONE_RECIPES,
            "is for classifiers (causal LMs share their output layer: soup them in full)": self.causal_lm_task,
            "writes a merged model (--output-kind merged)": self.output_kind != "merged",
            "reads downloaded candidates (drop --stream)": self.stream,
            "does not recalibrate BatchNorm (drop --recalibrate-bn)": bool(self.recalibrate_bn),
        }
        for problem, found in problems.items():
            if found:
                raise ConfigError(f"--soup backbone {problem}.")

    @property
    def image_task(self) -> bool:
        return is_image_task(self.task)

    @property
    def causal_lm_task(self) -> bool:
        return is_causal_lm_task(self.task)

    @property
    def scored(self) -> bool:
        return bool(self.task or self.dataset or self.scored_by_trainer)

    def options(self, recipe: type[SoupRecipe] | str) -> Any:
        """The `Options` of `recipe` (a class or a name) in this run: the given values, defaults for the rest."""
        name = recipe if isinstance(recipe, str) else recipe.name()
        return recipe_options(name, self._given_to(name))[name]

    def _given_to(self, name: str) -> dict[str, Any]:
        owners = option_owners()
        return {key: value for key, value in self.recipe_options.items() if name in owners.get(key, ())}

    def to_dict(self) -> dict:
        """The options as recorded in soup.json: `recipe_options` holds the recipe's own options in full (defaults
        included) and any given to the recipes it builds."""
        data = asdict(self)
        del data["scored_by_trainer"]
        data["recipe_options"] = {**self.recipe_options, **asdict(self.options(self.recipe))}
        return data

    @classmethod
    def from_options(cls, **options: Any) -> SoupConfig:
        """A config from flat keyword options, as `cook()` takes them: the recipes' options (`alpha=`,
        `passes=`, ...) go to `recipe_options`.

        Raises:
            ConfigError: a name that is neither a `SoupConfig` field nor a recipe option.
        """
        return cls(**split_options(options, {}))


def split_options(options: dict[str, Any], recipe_given: dict[str, Any]) -> dict[str, Any]:
    """`options` as `SoupConfig` keywords: recipe options merged over `recipe_given` into `recipe_options`."""
    fields_ = set(SoupConfig.__dataclass_fields__)
    owners = option_owners()
    unknown = sorted(set(options) - fields_ - set(owners))
    if unknown:
        raise ConfigError(
            f"Unknown option(s) {', '.join(unknown)}: the options are SoupConfig's fields and the recipes' "
            "options (`hf-soup cook --help` lists both as flags)."
        )
    recipe = {key: value for key, value in options.items() if key in owners and key not in fields_}
    kept = {key: value for key, value in options.items() if key in fields_}
    if recipe or "recipe_options" in kept:
        kept["recipe_options"] = {**recipe_given, **kept.get("recipe_options", {}), **recipe}
    return kept
