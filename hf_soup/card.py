"""The model card, from `model_cards/soup_card.md`, built only from data already gathered (no network)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

PAPER = "https://arxiv.org/abs/2203.05482"
CITATION = """@inproceedings{wortsman2022model,
  title={Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing inference time},
  author={Wortsman, Mitchell and Ilharco, Gabriel and Gadre, Samir Yitzhak and Roelofs, Rebecca and Gontijo-Lopes, Raphael and Morcos, Ari S and Namkoong, Hongseok and Farhadi, Ali and Carmon, Yair and Kornblith, Simon and Schmidt, Ludwig},
  booktitle={International Conference on Machine Learning},
  year={2022}
}"""


def template_path() -> Path:
    """The card template: packaged inside `hf_soup/` in wheels, at the repository root in a checkout."""
    packaged = Path(__file__).parent / "model_cards" / "soup_card.md"
    return packaged if packaged.is_file() else Path(__file__).parent.parent / "model_cards" / "soup_card.md"


def _pipeline_tag(manifest: dict[str, Any]) -> str:
    task = manifest.get("task") or {}
    return "image-classification" if task.get("name") == "image-classification" else "text-classification"


def _dataset_id(task: dict[str, Any]) -> str:
    """A Hub dataset id, or for local data a plain name (a file's or folder's stem): never a path."""
    dataset = task.get("dataset") or ""
    if _is_hub_id(dataset):
        return dataset
    name = Path(dataset).stem if dataset else task["name"]
    return re.sub(r"[^\w.-]+", "-", name).strip("-.") or "custom"


def _eval_results(manifest: dict[str, Any]) -> list[EvalResult]:
    task, soup = manifest.get("task"), manifest.get("soup")
    if not task or not soup:
        return []
    results = []
    for split, metrics in soup["report"].items():
        for metric, value in metrics.items():
            results.append(
                EvalResult(
                    task_type=_pipeline_tag(manifest),
                    dataset_type=_dataset_id(task),
                    dataset_name=_dataset_id(task) if task["name"] == "custom" else task["name"],
                    dataset_config=task.get("dataset_config"),
                    dataset_split=split,
                    metric_type=metric,
                    metric_value=round(float(value), 6),
                )
            )
    return results


def _is_hub_id(dataset: str | None) -> bool:
    return bool(dataset) and not Path(dataset).exists() and not dataset.startswith((".", "/"))


def _base_model(manifest: dict[str, Any]) -> tuple[list[str] | None, str | None]:
    """`base_model` lists Hub model ids only (the Hub rejects paths): the Hub ingredients, merged; else the Hub
    base the local ingredients were fine-tuned from; else nothing."""
    compatibility = manifest.get("compatibility") or {}
    on_hub = set(compatibility.get("hub") or [])
    hub_ingredients = [i["id"] for i in manifest["mixture"]["ingredients"] if i["id"] in on_hub]
    if hub_ingredients:
        return hub_ingredients, "merge"
    if compatibility.get("base_on_hub"):
        return [manifest["base"]], "finetune"
    return None, None


def build_model_card(manifest: dict[str, Any]) -> ModelCard:
    """The `ModelCard` of a soup, from its (portable) manifest."""
    ingredients = [i["id"] for i in manifest["mixture"]["ingredients"]]
    task = manifest.get("task")
    model_name = manifest.get("output") or "soup"
    base_model, relation = _base_model(manifest)
    card_data = ModelCardData(
        base_model=base_model,
        base_model_relation=relation,
        tags=["model-soup", "merge", "hf-soup"],
        datasets=[task["dataset"]] if task and _is_hub_id(task.get("dataset")) else None,  # Hub ids only
        eval_results=_eval_results(manifest) or None,
        model_name=model_name,
        library_name="peft" if manifest.get("lora") else "transformers",
        pipeline_tag=_pipeline_tag(manifest),
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path()),
        manifest=manifest,
        model_name=model_name,
        ingredients=ingredients,
        paper=PAPER,
        citation=CITATION,
    )


def write_model_card(folder: Path, manifest: dict[str, Any]) -> None:
    build_model_card(manifest).save(folder / "README.md")
