"""Human-readable tables for the terminal."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..evaluation.metrics import LOWER_IS_BETTER, describe_delta
from ..evaluation.tasks import CAUSAL_LM_TASK
from ..recipes import recipe_class
from ..results import CandidateRow, Entry, SoupSummary
from .names import soup_names


def format_delta(result: dict, metric: str = "accuracy") -> str:
    """`+0.8 [−0.2, +1.9]` (points) for metrics in [0, 1]; `-0.412 [-0.520, -0.301]` for perplexity and NLL."""
    if metric in LOWER_IS_BETTER:
        return f"{result['delta']:+.3f} [{result['low']:+.3f}, {result['high']:+.3f}]"
    return f"{result['delta'] * 100:+.1f} [{result['low'] * 100:+.1f}, {result['high'] * 100:+.1f}]"


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def compatibility_table(rows: list[tuple[str, str, str]]) -> str:
    return format_table(["candidate", "status", "detail"], [list(r) for r in rows])


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def soup_label(summary: SoupSummary) -> str:
    """The soup's name in tables: the recipe may add what it chose (WiSE-FT's α, a learned soup's temperature)."""
    return recipe_class(summary.recipe.name).label(summary.soup.name, summary.details)


class _Columns:
    """The table's columns: selection (in the selection metric, and the primary one if different), every report
    metric per report split, and ECE where the task is a classification."""

    def __init__(self, summary: SoupSummary):
        self.metric = summary.task.primary_metric
        self.chosen_by = summary.task.selection_metric or self.metric
        self.splits = list(summary.soup.report)
        self.also = [self.metric] if self.chosen_by != self.metric else []  # selection accuracy beside loss
        # Every report metric: the primary one, then the others (F1 for MRPC, top-5 accuracy for images).
        self.shown = [self.metric, *(m for m in summary.task.metrics if m != self.metric)]
        self.with_ece = any(v is not None for v in (summary.soup.ece or {}).values())

    def headers(self) -> list[str]:
        return [
            "model",
            "kept",
            "n",
            "cost",
            f"selection {self.chosen_by}",
            *(f"selection {m}" for m in self.also),
            *(f"{s} {m}" for s in self.splits for m in self.shown),
            *(f"{s} ECE" for s in self.splits if self.with_ece),
        ]

    def row(self, label: str, entry: Entry, kept: str = "", ece: bool = False) -> list[str]:
        eces = entry.ece or {}
        return [
            label,
            kept,
            str(len(entry.ingredients)),
            f"{entry.forward_passes}x",
            _fmt(entry.selection_score(self.chosen_by)),
            *(_fmt(entry.selection[m]) for m in self.also),
            *(_fmt(entry.report[s].get(m)) for s in self.splits for m in self.shown),
            *((_fmt(eces.get(s)) if ece else "" for s in self.splits) if self.with_ece else ()),
        ]


def soup_table(summary: SoupSummary) -> str:
    """Every candidate, then best individual / uniform / soup / ensembles, with selection and report scores,
    then the paired comparisons, ties, warnings and notes.

    The `cost` column is forward passes per input: 1 for any single model or soup, N for an N-model ensemble.
    ECE (15 bins) is shown for the report split(s) where the task is a classification.
    """
    columns = _Columns(summary)
    name = soup_names(summary)
    rows = [columns.row(name(c.id), c.scores, _kept(c)) for c in summary.candidates]
    rows.append(["" for _ in columns.headers()])
    best = summary.best_individual
    rows.append(columns.row(f"best individual ({name(best.id)})", best, ece=True))
    if summary.best_by_selection_metric:
        other = summary.best_by_selection_metric
        rows.append(
            columns.row(f"best by {columns.chosen_by} ({name(other.id)}; not compared)", other, ece=True)
        )
    if summary.oracle and summary.oracle.id != best.id:
        oracle = summary.oracle
        rows.append(columns.row(f"oracle on {oracle.split} ({name(oracle.id)}; not a claim)", oracle))
    if summary.base_with_head:  # a backbone soup's start
        rows.append(columns.row(summary.base_with_head.name, summary.base_with_head, ece=True))
    rows.append(columns.row("uniform soup", summary.uniform, ece=True))
    rows.append(columns.row(soup_label(summary), summary.soup, ece=True))
    averaged = "probabilities" if summary.task.name == CAUSAL_LM_TASK else "logits"
    for ensemble in summary.ensembles or []:
        rows.append(columns.row(f"{ensemble.name} ({averaged})", ensemble, ece=True))
    lines = [format_table(columns.headers(), rows), *_claims(summary, columns, name), *_backbone(summary)]
    lines += _ties(summary.ties, columns.chosen_by, name)
    lines += [f"WARNING: {warning}" for warning in summary.warnings]
    if summary.task.positive_label is not None:
        lines.append(f"NOTE: F1 counts {summary.task.positive_label!r} as the positive label.")
    lines += [f"NOTE: {note}" for note in summary.splits.notes]
    return "\n".join(lines)


def _claims(summary: SoupSummary, columns: _Columns, name: Callable[[str], str]) -> list[str]:
    """The soup against the best individual on each report split, then every paired comparison."""
    soup, best, metric = summary.soup, summary.best_individual, columns.metric
    lines = []
    for split in columns.splits:
        delta = soup.report[split][metric] - best.report[split][metric]
        lines.append(
            f"{soup.name} vs best individual ({name(best.id)}, the best selection {metric}) on {split}: "
            f"{describe_delta(metric, delta)}"
        )
    for split, comparisons in (summary.comparisons or {}).items():
        for name, by_metric in comparisons.items():
            for metric_name, result in by_metric.items():
                verdict = "significant at 95%" if result.significant else "not significant at 95%"
                extra = f", McNemar p={result.mcnemar['p_value']:.3f}" if result.mcnemar else ""
                unit = "" if metric_name in LOWER_IS_BETTER else " points"
                lines.append(
                    f"  {name} − best individual, {split} {metric_name}: "
                    f"{format_delta(result.to_dict(), metric_name)}{unit} (paired bootstrap 95% CI{extra}; {verdict})"
                )
    return lines


def _backbone(summary: SoupSummary) -> list[str]:
    """What a backbone soup souped, and where its head came from."""
    if not summary.backbone:
        return []
    left_out = summary.compatibility.get("left_out") or {}
    return [
        f"BACKBONE SOUP: only the body shared with the base was souped; each ingredient's own head was left out "
        f"({sum(map(len, left_out.values()))} tensors, listed in soup.json). Head for {summary.task.name}: "
        f"{summary.backbone['described']} ({', '.join(summary.backbone['head_tensors'])}), part of every scored "
        "trial."
    ]


def _ties(ties: list[dict], chosen_by: str, name: Callable[[str], str]) -> list[str]:
    lines = []
    for tie in ties:
        at = f"TIE at selection {tie.get('metric', chosen_by)} {tie['score']:.4f}"
        members = [(name(c), loss) for c, loss in zip(tie["candidates"], tie["losses"])]
        if len(members) > 2:  # a long list stays in the JSON report; the table names the winner
            first, loss = members[0]
            lines.append(
                f"{at} between {len(members)} candidates, broken by {tie['broken_by']}: {first} "
                f"(loss {loss:.4f}) ranks first."
            )
        else:
            order = ", ".join(f"{c} (loss {loss:.4f})" for c, loss in members)
            lines.append(f"{at}: {order}; broken by {tie['broken_by']}.")
    return lines


def _kept(candidate: CandidateRow) -> str:
    if candidate.excluded:
        return "no (flagged: not fine-tuned from the base?)"
    return "yes" if candidate.kept else "no"


def lora_summary(lora: dict[str, Any]) -> str:
    """One line (plus the worst modules) on the LoRA output: exact, or truncated with its Frobenius error."""
    truncation = lora.get("truncation")
    if not truncation:
        return f"LoRA adapter of rank {lora['rank']}: exact (every module's B @ A is the soup's update)."
    worst = sorted(truncation["modules"].items(), key=lambda item: -item[1])[:3]
    modules = ", ".join(f"{name} {error:.4f}" for name, error in worst)
    return (
        f"LoRA adapter truncated to rank {truncation['rank']} by SVD: relative Frobenius error "
        f"{truncation['overall']:.4f} overall; worst modules: {modules} (all in soup.json)."
    )


def profile_table(timings: dict[str, float], bytes_read: dict[str, int]) -> str:
    """`--profile`: each stage's wall seconds and the tensor bytes it read from the inputs, with the total."""
    rows = [
        [stage, f"{seconds:.2f}", _gigabytes(bytes_read.get(stage))] for stage, seconds in timings.items()
    ]
    read = sum(bytes_read.values()) if bytes_read else None
    rows.append(["total", f"{sum(timings.values()):.2f}", _gigabytes(read)])
    return format_table(["stage", "seconds", "read from inputs"], rows)


def _gigabytes(count: int | None) -> str:
    return "" if count is None else f"{count / 1e9:.3f} GB"
