"""The soup's plots: the recipe's trajectory, and each candidate's selection vs report score."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt

from ..evaluation.metrics import LOWER_IS_BETTER
from ..recipes import recipe_class
from ..results import Entry, SoupSummary
from .names import short_names, soup_names


def write_plots(folder: Path, summary: SoupSummary) -> list[str]:
    """Write the soup's plots into `folder`; return their paths relative to its parent.

    `trajectory.png` (the recipe's trials), `candidates.png` (each candidate's selection vs report score), the
    recipe's own curve if it has one (`wise.png`), and `angles.png` (the task vectors' angles).
    """
    folder.mkdir(parents=True, exist_ok=True)
    metric = summary.task.primary_metric
    chosen_by = summary.task.selection_metric or metric
    written = []
    if summary.trajectory:
        _write_trajectory(folder / "trajectory.png", summary, chosen_by)
        written.append(f"{folder.name}/trajectory.png")
    _write_candidates(folder / "candidates.png", summary, metric, chosen_by)
    written.append(f"{folder.name}/candidates.png")
    recipe = recipe_class(summary.recipe.name)
    curve = (summary.details or {}).get("curve") or []
    if recipe.curve_plot and len(curve) > 1:
        write_curve(
            folder / f"{recipe.name()}.png",
            [Entry.from_dict(p) for p in curve],
            recipe.curve_plot,
            [p[recipe.curve_plot[0]] for p in curve],
            (metric, chosen_by),
        )
        written.append(f"{folder.name}/{recipe.name()}.png")
    if summary.diagnostics and len(summary.diagnostics["ids"]) > 1:
        write_angle_heatmap(folder / "angles.png", summary.diagnostics, soup_names(summary))
        written.append(f"{folder.name}/angles.png")
    return written


def _write_trajectory(path: Path, summary: SoupSummary, chosen_by: str) -> None:
    sign = (
        -1.0 if chosen_by == "loss" or chosen_by in LOWER_IS_BETTER else 1.0
    )  # trajectories: higher is better
    trajectory = summary.trajectory
    fig, ax = plt.subplots(figsize=(6, 3.5))
    scored = [(t["step"], sign * t["score"]) for t in trajectory if t["score"] is not None]
    ax.plot(*zip(*scored), color="0.6", zorder=1)
    for accepted, color, label in ((True, "tab:green", "kept"), (False, "tab:red", "rejected")):
        points = [
            (t["step"], sign * t["score"])
            for t in trajectory
            if t["accepted"] == accepted and t["score"] is not None
        ]
        if points:
            ax.scatter(*zip(*points), color=color, label=label, zorder=2)
    stopped = [t["step"] for t in trajectory if t.get("stopped_early")]
    if stopped:
        floor = min(y for _, y in scored) if sign > 0 else max(y for _, y in scored)
        ax.scatter(
            stopped, [floor] * len(stopped), marker="x", color="tab:red", label="stopped early (rejected)"
        )
    ax.set_xlabel("trial")
    ax.set_ylabel(f"selection {chosen_by}")
    ax.set_title(f"{summary.recipe.pretty_name}: trajectory")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _write_candidates(path: Path, summary: SoupSummary, metric: str, chosen_by: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = summary.candidates
    ax.scatter(
        [c.scores.selection_score(chosen_by) for c in rows],
        [c.scores.first_report(metric) for c in rows],
        c=["tab:green" if c.kept else "tab:gray" for c in rows],
        label="candidates (green: in the soup)",
    )
    for entry, marker in ((summary.uniform, "s"), (summary.soup, "*")):
        ax.scatter(
            entry.selection_score(chosen_by),
            entry.first_report(metric),
            marker=marker,
            s=150,
            label=entry.name,
        )
    ax.set_xlabel(f"selection {chosen_by}")
    ax.set_ylabel(f"report {metric}")
    ax.set_title("Candidates and soups")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_curve(path: Path, curve: list[Entry], axis: tuple[str, str, str], xs: list[float], metrics) -> None:
    """Selection and report scores along a recipe's curve (WiSE-FT: each alpha, 0 = the base's body, 1 = the
    fine-tuned soup). `axis` is (the x field, its label, the title); `metrics` is (primary, selection)."""
    metric, chosen_by = metrics
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(xs, [p.selection_score(chosen_by) for p in curve], marker="o", label=f"selection {chosen_by}")
    ax.set_xlabel(axis[1])
    ax.set_ylabel(f"selection {chosen_by}")
    right = ax.twinx()
    for split in curve[0].report:
        right.plot(
            xs,
            [p.report[split][metric] for p in curve],
            marker="s",
            color="tab:orange",
            label=f"{split} {metric}",
        )
    right.set_ylabel(f"report {metric}")
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize="small")
    ax.set_title(axis[2])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_angle_heatmap(path: Path, diagnostics: dict, name: Callable[[str], str] | None = None) -> None:
    """Pairwise angles (degrees) between the candidates' task vectors (θ_i − θ_base), as a heatmap."""
    angles = diagnostics["angle_degrees"]
    count = len(angles)
    name = name or short_names(diagnostics["ids"]).__getitem__  # `check --diagnostics` has no summary
    rows = [f"#{i + 1} {name(cid)}" for i, cid in enumerate(diagnostics["ids"])]  # which candidate is which
    width = 1.2 + 0.6 * count + 0.07 * max(len(r) for r in rows)
    fig, ax = plt.subplots(figsize=(width, 0.8 + 0.6 * count))
    image = ax.imshow(angles, vmin=0, vmax=max(90.0, *(max(r) for r in angles)), cmap="viridis")
    ax.set_xticks(range(count), [f"#{i + 1}" for i in range(count)])
    ax.set_yticks(range(count), rows)
    if count <= 16:
        for i in range(count):
            for j in range(count):
                ax.text(j, i, f"{angles[i][j]:.0f}", ha="center", va="center", color="w", fontsize="small")
    fig.colorbar(image, ax=ax, label="angle between task vectors (degrees)")
    ax.set_title("Fine-tuning directions")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
