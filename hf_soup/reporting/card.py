"""The model card, from `model_cards/soup_card.md`, built only from data already gathered (no network)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import jinja2
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..evaluation.metrics import LOWER_IS_BETTER
from ..evaluation.tasks import DATA_BUILDERS, IMAGE_TASK
from ..recipes import recipe_class
from ..results import SoupManifest, SoupSummary, TaskInfo
from .names import soup_names

# Recipe sections are rendered apart, then placed in the template: their last newline is part of the text.
_SECTIONS = jinja2.Environment(keep_trailing_newline=True)
CITATION = """@inproceedings{wortsman2022model,
  title={Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing inference time},
  author={Wortsman, Mitchell and Ilharco, Gabriel and Gadre, Samir Yitzhak and Roelofs, Rebecca and Gontijo-Lopes, Raphael and Morcos, Ari S and Namkoong, Hongseok and Farhadi, Ali and Carmon, Yair and Kornblith, Simon and Schmidt, Ludwig},
  booktitle={International Conference on Machine Learning},
  year={2022}
}"""


def template_path() -> Path:
    """The card template: packaged inside `hf_soup/` in wheels, at the repository root in a checkout."""
    package = Path(__file__).parents[1]
    packaged = package / "model_cards" / "soup_card.md"
    return packaged if packaged.is_file() else package.parent / "model_cards" / "soup_card.md"


# The model class's suffix -> the Hub's pipeline tag (the widget and the task filter users search by).
_PIPELINE_TAGS = {
    "ForCausalLM": "text-generation",
    "LMHeadModel": "text-generation",
    "ForImageClassification": "image-classification",
    "ForSequenceClassification": "text-classification",
    "ForMaskedLM": "fill-mask",
    "Model": "feature-extraction",
}


def _pipeline_tag(summary: SoupSummary) -> str | None:
    """From the task scored, else from the soup's model class (`config.json`'s `architectures`)."""
    task = summary.task
    if task:
        return {"image-classification": "image-classification", "causal-lm": "text-generation"}.get(
            task.name, "text-classification"
        )
    for architecture in summary.compatibility.get("architectures") or []:
        for suffix, tag in _PIPELINE_TAGS.items():
            if architecture.endswith(suffix):
                return tag
    return None


_SPLIT_WORDS = {"train", "training", "test", "testing", "validation", "valid", "val", "dev", "eval", "data"}


def _readable(text: str) -> str:
    return re.sub(r"[^\w.-]+", "-", text).strip("-.") or "custom"


def _local_dataset(task: TaskInfo) -> tuple[str, str]:
    """model-index's (`type`, `name`) for local data. The type is the `datasets` builder that read it (`csv`,
    `json`, `parquet`, `imagefolder`), as Trainer's cards have it: a dataset id the Hub accepts that claims no Hub
    dataset. The name is the file's or folder's stem, with its folder's for a split-named file
    (`fine_foods/train.csv` is "fine_foods")."""
    path = Path(task.dataset or task.name)
    folder_builder = (
        "imagefolder" if task.name == IMAGE_TASK else "parquet"
    )  # a folder: its task's usual export
    builder = DATA_BUILDERS.get(path.suffix.lower(), folder_builder)
    stem = path.stem if path.suffix else path.name
    if stem.lower() in _SPLIT_WORDS and path.parent.name not in ("", ".", ".."):
        stem = path.parent.name
    return builder, _readable(stem)


def dataset_label(task: TaskInfo) -> str:
    """The data as the card's text names it: a Hub id (and config), or a local file's readable name and format."""
    if _is_hub_id(task.dataset):
        return " ".join(filter(None, [task.dataset, task.dataset_config]))
    builder, name = _local_dataset(task)
    return f"{name}, local {builder}"


def _split_name(split: str) -> str:
    """A report split as the card names it: `test.csv` (a file given as the split) is "test"."""
    return Path(split).stem if Path(split).suffix.lower() in DATA_BUILDERS else split


def _eval_results(summary: SoupSummary) -> list[EvalResult]:
    task, soup = summary.task, summary.soup
    if not task or not soup:
        return []
    if _is_hub_id(task.dataset):
        dataset_type, dataset_name = task.dataset, " ".join(filter(None, [task.dataset, task.dataset_config]))
    else:
        dataset_type, dataset_name = _local_dataset(task)
    results = []
    for split, metrics in soup.report.items():
        for metric, value in metrics.items():
            results.append(
                EvalResult(
                    task_type=_pipeline_tag(summary),
                    dataset_type=dataset_type,
                    dataset_name=dataset_name,
                    dataset_config=task.dataset_config,
                    dataset_split=_split_name(split),
                    metric_type=metric,
                    metric_value=round(float(value), 6),
                )
            )
    return results


def _is_hub_id(dataset: str | None) -> bool:
    return bool(dataset) and not Path(dataset).exists() and not dataset.startswith((".", "/"))


def _base_model(summary: SoupSummary) -> tuple[list[str] | None, str | None]:
    """`base_model` lists Hub model ids only (the Hub rejects paths): the Hub ingredients, merged; else the Hub
    base the local ingredients were fine-tuned from; else nothing."""
    compatibility = summary.compatibility or {}
    on_hub = set(compatibility.get("hub") or [])
    hub_ingredients = [cid for cid in summary.mixture.ids() if cid in on_hub]
    if hub_ingredients:
        return hub_ingredients, "merge"
    if compatibility.get("base_on_hub"):
        return [summary.base], "finetune"
    return None, None


def recipe_section(summary: SoupSummary, name: Callable[[str], str]) -> str:
    """The recipe's own part of the card (WiSE-FT's α curve, learned weights), from its `card_section`."""
    recipe = recipe_class(summary.recipe.name)
    if not recipe.card_section or summary.details is None:
        return ""
    task = summary.task
    return _SECTIONS.from_string(recipe.card_section).render(
        m=summary,
        details=summary.details,
        metric=task.primary_metric if task else None,
        chosen_by=task.selection_metric if task else None,
        name=name,
    )


def build_model_card(manifest: SoupManifest) -> ModelCard:
    """The `ModelCard` of a soup, from its (portable) manifest."""
    summary = manifest.summary
    model_name = manifest.output or "soup"
    base_model, relation = _base_model(summary)
    name = soup_names(summary)
    task = summary.task
    card_data = ModelCardData(
        base_model=base_model,
        base_model_relation=relation,
        tags=["model-soup", "merge", "hf-soup"],
        datasets=[task.dataset] if task and _is_hub_id(task.dataset) else None,  # Hub ids only
        eval_results=_eval_results(summary) or None,
        model_name=model_name,
        library_name="peft" if summary.lora else "transformers",
        pipeline_tag=_pipeline_tag(summary),
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path()),
        manifest=manifest,
        model_name=model_name,
        ingredients=summary.mixture.ids(),
        name=name,
        dataset=dataset_label(task) if task else None,
        reference_title=recipe_class(summary.recipe.name).reference_title(),
        recipe_section=recipe_section(summary, name),
        citation=CITATION,
        lower_is_better=sorted(
            LOWER_IS_BETTER | {"loss"}
        ),  # shown as they are; trajectories store them negated
    )


def write_model_card(folder: Path, manifest: SoupManifest) -> None:
    build_model_card(manifest).save(folder / "README.md")
