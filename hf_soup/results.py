"""Typed results: what a soup run found (`SoupSummary`) and what its folder holds (`SoupManifest`).

`cook` returns them; the table, the card, the plots, the CLI and `reproduce` read their attributes. `to_dict` is
the JSON of `soup.json` (`format_version` 2); `from_dict` reads it back, including a `soup.json` written by
hf-soup 0.3.0, which had no `format_version`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .mixture import Mixture

MANIFEST_NAME = "soup.json"
FORMAT_VERSION = 2  # 1: hf-soup <= 0.3.0 (no `format_version` field)


def _without(data: dict[str, Any], *names: str) -> dict[str, Any]:
    return {key: value for key, value in data.items() if key not in names}


# What `SoupCallback` (training/integrations.py) writes beside a run's weights: how it was trained.
INGREDIENT_FILE = "hf_soup_ingredient.json"


@dataclass
class Entry:
    """One row of the results: a candidate, the best individual, a soup, a baseline or a logit ensemble.

    Scores are on the selection split and on each report split; `forward_passes` is the inference cost per input
    (1 for any single model or soup, N for an N-model ensemble).
    """

    name: str
    ingredients: list[str]
    forward_passes: int
    selection: dict[str, float]
    selection_loss: float
    report: dict[str, dict[str, float]]
    report_loss: dict[str, float]
    ece: dict[str, float | None]
    id: str | None = None  # rows that are one candidate
    split: str | None = None  # the oracle: the report split it was chosen on

    def selection_score(self, metric: str) -> float:
        """The selection score in the metric's own units (a loss is not negated here)."""
        return self.selection_loss if metric == "loss" else self.selection[metric]

    def first_report(self, metric: str) -> float:
        return next(iter(self.report.values()))[metric]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {key: value for key, value in data.items() if key not in ("id", "split") or value is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Entry:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


@dataclass
class CandidateRow:
    """A candidate: whether it is in the soup, why it was kept out, how it was trained, and (when data was
    scored) its scores."""

    id: str
    kept: bool
    excluded: str | None = None
    scores: Entry | None = None
    training: dict | None = None

    def to_dict(self) -> dict[str, Any]:
        head = {"id": self.id, "kept": self.kept, "excluded": self.excluded}
        if self.scores is None:
            return head
        return {**self.scores.to_dict(), **head, "training": self.training}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CandidateRow:
        scores = Entry.from_dict(data) if "selection" in data else None
        return cls(data["id"], data["kept"], data.get("excluded"), scores, data.get("training"))


@dataclass
class Comparison:
    """A paired difference (soup − best individual) on one report split and metric, with its 95% interval."""

    delta: float
    low: float
    high: float
    significant: bool
    mcnemar: dict[str, Any] | None = None  # accuracy: McNemar's exact test

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return data if self.mcnemar is not None else _without(data, "mcnemar")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Comparison:
        return cls(data["delta"], data["low"], data["high"], data["significant"], data.get("mcnemar"))


# {report split: {"soup" | "uniform" | "ensemble": {metric: Comparison}}}
Comparisons = dict[str, dict[str, dict[str, Comparison]]]


def comparisons_from_dict(data: dict | None) -> Comparisons | None:
    if data is None:
        return None
    return {
        split: {
            name: {metric: Comparison.from_dict(r) for metric, r in by_metric.items()}
            for name, by_metric in by_name.items()
        }
        for split, by_name in data.items()
    }


def comparisons_to_dict(comparisons: Comparisons | None) -> dict | None:
    if comparisons is None:
        return None
    return {
        split: {
            name: {metric: r.to_dict() for metric, r in by_metric.items()}
            for name, by_metric in by_name.items()
        }
        for split, by_name in comparisons.items()
    }


@dataclass
class RecipeInfo:
    name: str
    pretty_name: str
    reference_url: str


@dataclass
class TaskInfo:
    name: str
    metrics: list[str]
    primary_metric: str
    selection_metric: str
    positive_label: str | None
    dataset: str
    dataset_config: str | None


@dataclass
class SplitsInfo:
    selection: dict[str, Any]  # {"name", "size"}
    report: dict[str, dict[str, Any]]  # {split: {"size"}}
    same_split: bool
    notes: list[str]


_NESTED = {"recipe": RecipeInfo, "task": TaskInfo, "splits": SplitsInfo}
_ENTRIES = ("best_individual", "best_by_selection_metric", "oracle", "uniform", "soup", "base_with_head")
# In soup.json only when they happened.
_WHEN_SET = ("best_by_selection_metric", "batchnorm", "lora", "backbone", "base_with_head")
_WHEN_SCORED = ("oracle", "trajectory", "comparisons", "ties")  # not in a plain merge's soup.json


@dataclass
class SoupSummary:
    """What one soup run found: the candidates and their scores, the best individual, the soup, the baselines,
    the paired comparisons, and how the run went. Unscored runs (a plain merge) leave the scores `None`.

    `details` is the recipe's own record (WiSE-FT's α curve, a learned soup's weights), stored in `soup.json`
    under the recipe's name (`details_key`: `ties_recipe` for TIES, whose name is taken by the tie-breaks).
    """

    recipe: RecipeInfo
    base: str
    command: str
    config: dict[str, Any]
    compatibility: dict[str, Any]
    excluded: dict[str, str]
    dtype: str
    candidates: list[CandidateRow]
    mixture: Mixture
    task: TaskInfo | None = None
    splits: SplitsInfo | None = None
    best_individual: Entry | None = None
    best_by_selection_metric: Entry | None = None
    oracle: Entry | None = None
    uniform: Entry | None = None
    soup: Entry | None = None
    ensembles: list[Entry] | None = None
    trajectory: list[dict[str, Any]] = field(default_factory=list)
    comparisons: Comparisons | None = None
    ties: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    details: dict[str, Any] | None = None
    diagnostics: dict[str, Any] | None = None
    batchnorm: dict[str, Any] | None = None
    cache: dict[str, Any] = field(default_factory=dict)
    processes: int = 1
    lora: dict[str, Any] | None = None  # --output-kind lora: the adapter's rank and truncation
    # --soup backbone: the head (probe or a candidate's) and its tensors; the base's body with that head.
    backbone: dict[str, Any] | None = None
    base_with_head: Entry | None = None

    @property
    def scored(self) -> bool:
        return self.soup is not None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.name == "details" or (item.name in _WHEN_SET and value is None):
                continue
            if item.name in _WHEN_SCORED and not self.scored:
                continue
            data[item.name] = comparisons_to_dict(value) if item.name == "comparisons" else _plain(value)
        if self.details is not None:
            data[details_key(self.recipe.name)] = self.details
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SoupSummary:
        values = {f.name: data.get(f.name) for f in dataclasses.fields(cls) if f.name in data}
        for name, kind in _NESTED.items():
            if values.get(name) is not None:
                values[name] = kind(**values[name])
        for name in _ENTRIES:
            if values.get(name) is not None:
                values[name] = Entry.from_dict(values[name])
        if values.get("ensembles") is not None:
            values["ensembles"] = [Entry.from_dict(e) for e in values["ensembles"]]
        values["candidates"] = [CandidateRow.from_dict(c) for c in data.get("candidates") or []]
        values["mixture"] = Mixture.from_dict(data["mixture"])
        values["comparisons"] = comparisons_from_dict(data.get("comparisons"))
        values["details"] = data.get(details_key(values["recipe"].name))
        values.setdefault("excluded", {})  # hf-soup 0.3.0 recorded none
        values.setdefault("dtype", "auto")
        return cls(**{key: value for key, value in values.items() if key in cls.__dataclass_fields__})


def details_key(recipe: str) -> str:
    """Where `soup.json` keeps a recipe's own record: under its name, unless a summary field has that name."""
    return f"{recipe}_recipe" if recipe in SoupSummary.__dataclass_fields__ else recipe


def _plain(value: Any) -> Any:
    """A typed value as JSON-ready data."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


@dataclass
class WrittenFiles:
    """What the writer put in the folder: weight files, each tensor's sha256, and plots."""

    files: list[str]
    tensor_sha256: dict[str, str]
    plots: list[str] = field(default_factory=list)
    lora: dict[str, Any] | None = None


@dataclass
class SoupManifest:
    """`soup.json`: the summary as written into the folder (paths relative to it), plus what was written and
    with which package versions."""

    summary: SoupSummary
    output: str  # the folder's name
    files: list[str]
    tensor_sha256: dict[str, str]
    versions: dict[str, str]
    created: str
    tokenizer_from: str | None = None
    plots: list[str] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    def __getattr__(self, name: str) -> Any:
        """The summary's fields read through the manifest (`manifest.soup`), as the card template does."""
        if name == "summary":  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.summary, name)

    def to_dict(self) -> dict[str, Any]:
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "summary"}
        return {**self.summary.to_dict(), **own}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SoupManifest:
        return cls(
            summary=SoupSummary.from_dict(data),
            output=data.get("output") or "",
            files=data.get("files", []),
            tensor_sha256=data["tensor_sha256"],
            versions=data.get("versions", {}),
            created=data.get("created", ""),
            tokenizer_from=data.get("tokenizer_from"),
            plots=data.get("plots", []),
            format_version=data.get("format_version", 1),
        )
