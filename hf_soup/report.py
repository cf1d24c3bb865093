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


def soup_table(report: dict[str, Any]) -> str:
    """Every candidate, then best individual / uniform / soup, with selection and report scores."""
    metric = report["task"]["primary_metric"]
    chosen_by = report["task"].get("selection_metric", metric)
    splits = list(report["soup"]["report"])
    also = [metric] if chosen_by != metric else []  # e.g. selection accuracy beside selection loss
    headers = ["model", "kept", "n", f"selection {chosen_by}", *(f"selection {m}" for m in also),
               *(f"{s} {metric}" for s in splits)]  # fmt: skip

    def row(label: str, entry: dict, kept: str = "") -> list[str]:
        return [
            label,
            kept,
            str(len(entry["ingredients"])),
            _fmt(selection_score(entry, chosen_by)),
            *(_fmt(entry["selection"][m]) for m in also),
            *(_fmt(entry["report"][s][metric]) for s in splits),
        ]

    rows = [row(c["id"], c, "yes" if c["kept"] else "no") for c in report["candidates"]]
    rows.append(["" for _ in headers])
    rows.append(row(f"best individual ({report['best_individual']['name']})", report["best_individual"]))
    rows.append(row("uniform soup", report["uniform"]))
    rows.append(row(report["soup"]["name"], report["soup"]))
    lines = [format_table(headers, rows)]
    best, soup = report["best_individual"], report["soup"]
    for split in splits:
        delta = soup["report"][split][metric] - best["report"][split][metric]
        lines.append(
            f"{report['soup']['name']} vs best individual on {split}: {delta * 100:+.2f} points of {metric}"
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
        order = ", ".join(f"{c} (loss {loss:.4f})" for c, loss in zip(tie["candidates"], tie["losses"]))
        lines.append(f"TIE at selection {tie['score']:.4f}: {order}; broken by {tie['broken_by']}.")
    for warning in report.get("warnings") or []:
        lines.append(f"WARNING: {warning}")
    for note in report["splits"]["notes"]:
        lines.append(f"NOTE: {note}")
    return "\n".join(lines)
