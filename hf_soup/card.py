"""The model card, from `model_cards/soup_card.md`, built only from data already gathered (no network)."""

from __future__ import annotations

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
                    dataset_type=task["dataset"] or task["name"],
                    dataset_name=task["name"],
                    dataset_config=task.get("dataset_config"),
                    dataset_split=split,
                    metric_type=metric,
                    metric_value=round(float(value), 6),
                )
            )
    return results


def _is_hub_id(dataset: str | None) -> bool:
    return bool(dataset) and not Path(dataset).exists() and not dataset.startswith((".", "/"))


def build_model_card(manifest: dict[str, Any]) -> ModelCard:
    """The `ModelCard` of a soup, from its manifest."""
    ingredients = [i["id"] for i in manifest["mixture"]["ingredients"]]
    task = manifest.get("task")
    model_name = Path(manifest["output"]).name if manifest.get("output") else "soup"
    card_data = ModelCardData(
        base_model=ingredients,
        base_model_relation="merge",
        tags=["model-soup", "merge", "hf-soup"],
        datasets=[task["dataset"]] if task and _is_hub_id(task.get("dataset")) else None,
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
