"""Human-readable tables for the terminal."""

from __future__ import annotations

from typing import Any

from .stats import format_delta


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def compatibility_table(rows: list[tuple[str, str, str]]) -> str:
    return format_table(["candidate", "status", "detail"], [list(r) for r in rows])


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def selection_score(entry: dict[str, Any], metric: str) -> float:
    """An entry's selection score in the selection metric's own units (loss is not negated here)."""
    return entry["selection_loss"] if metric == "loss" else entry["selection"][metric]


def _soup_label(report: dict[str, Any]) -> str:
    if report.get("wise"):
        return f"{report['soup']['name']} (alpha={report['wise']['alpha']:g} on the {report['wise']['endpoint']} soup)"
    if report.get("learned"):
        return f"{report['soup']['name']} ({report['learned']['granularity']} weights, T={report['learned']['temperature']:.3f})"
    return report["soup"]["name"]


def soup_table(report: dict[str, Any]) -> str:
    """Every candidate, then best individual / uniform / soup / ensembles, with selection and report scores.

    The `cost` column is forward passes per input: 1 for any single model or soup, N for an N-model ensemble.
    ECE (15 bins) is shown for the report split(s) where the task is a classification.
    """
    metric = report["task"]["primary_metric"]
    chosen_by = report["task"].get("selection_metric", metric)
    splits = list(report["soup"]["report"])
    also = [metric] if chosen_by != metric else []  # e.g. selection accuracy beside selection loss
    # Every report metric: the primary one, then the others (F1 for MRPC, top-5 accuracy for images).
    shown = [metric, *(m for m in report["task"].get("metrics", [metric]) if m != metric)]
    with_ece = any(v is not None for v in (report["soup"].get("ece") or {}).values())
    headers = ["model", "kept", "n", "cost", f"selection {chosen_by}", *(f"selection {m}" for m in also),
               *(f"{s} {m}" for s in splits for m in shown), *(f"{s} ECE" for s in splits if with_ece)]  # fmt: skip

    def row(label: str, entry: dict, kept: str = "", ece: bool = False) -> list[str]:
        eces = entry.get("ece") or {}
        return [
            label,
            kept,
            str(len(entry["ingredients"])),
            f"{entry.get('forward_passes', 1)}x",
            _fmt(selection_score(entry, chosen_by)),
            *(_fmt(entry["selection"][m]) for m in also),
            *(_fmt(entry["report"][s].get(m)) for s in splits for m in shown),
            *((_fmt(eces.get(s)) if ece else "" for s in splits) if with_ece else ()),
        ]

    rows = [row(c["id"], c, _kept(c)) for c in report["candidates"]]
    rows.append(["" for _ in headers])
    best = report["best_individual"]
    rows.append(row(f"best individual ({best['id']})", best, ece=True))
    if report.get("best_by_selection_metric"):
        other = report["best_by_selection_metric"]
        rows.append(row(f"best by {chosen_by} ({other['id']}; not compared)", other, ece=True))
    if report.get("oracle") and report["oracle"]["id"] != best["id"]:
        oracle = report["oracle"]
        rows.append(
            row(
                f"oracle on {oracle['split']} ({oracle['id']}; not a claim)",
                oracle,
            )
        )
    rows.append(row("uniform soup", report["uniform"], ece=True))
    rows.append(row(_soup_label(report), report["soup"], ece=True))
    for ensemble in report.get("ensembles") or []:
        rows.append(row(f"{ensemble['name']} (logits)", ensemble, ece=True))
    lines = [format_table(headers, rows)]
    soup = report["soup"]
    for split in splits:
        delta = soup["report"][split][metric] - best["report"][split][metric]
        lines.append(
            f"{soup['name']} vs best individual ({best['id']}, the best selection {metric}) on {split}: "
            f"{delta * 100:+.2f} points of {metric}"
        )
    for split, comparisons in (report.get("comparisons") or {}).items():
        for name, by_metric in comparisons.items():
            for metric_name, result in by_metric.items():
                verdict = "significant at 95%" if result["significant"] else "not significant at 95%"
                extra = f", McNemar p={result['mcnemar']['p_value']:.3f}" if "mcnemar" in result else ""
                lines.append(
                    f"  {name} − best individual, {split} {metric_name}: {format_delta(result)} points "
                    f"(paired bootstrap 95% CI{extra}; {verdict})"
                )
    for tie in report.get("ties") or []:
        at = f"TIE at selection {tie.get('metric', chosen_by)} {tie['score']:.4f}"
        members = list(zip(tie["candidates"], tie["losses"]))
        if len(members) > 2:  # a long list stays in the JSON report; the table names the winner
            first, loss = members[0]
            lines.append(f"{at} between {len(members)} candidates, broken by {tie['broken_by']}: {first} "
                         f"(loss {loss:.4f}) ranks first.")  # fmt: skip
        else:
            order = ", ".join(f"{c} (loss {loss:.4f})" for c, loss in members)
            lines.append(f"{at}: {order}; broken by {tie['broken_by']}.")
    for warning in report.get("warnings") or []:
        lines.append(f"WARNING: {warning}")
    if report["task"].get("positive_label") is not None:
        lines.append(f"NOTE: F1 counts {report['task']['positive_label']!r} as the positive label.")
    for note in report["splits"]["notes"]:
        lines.append(f"NOTE: {note}")
    return "\n".join(lines)


def _kept(candidate: dict[str, Any]) -> str:
    if candidate.get("excluded"):
        return "no (flagged: not fine-tuned from the base?)"
    return "yes" if candidate["kept"] else "no"


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
