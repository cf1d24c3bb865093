"""The soup's plots: the recipe's trajectory, and each candidate's selection vs report score."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt

from .report import selection_score


def _first_report(entry: dict[str, Any], metric: str) -> float:
    return next(iter(entry["report"].values()))[metric]


def write_plots(folder: Path, report: dict[str, Any]) -> list[str]:
    """Write `trajectory.png` and `candidates.png` into `folder`; return their paths relative to its parent."""
    folder.mkdir(parents=True, exist_ok=True)
    metric = report["task"]["primary_metric"]
    chosen_by = report["task"].get("selection_metric", metric)
    sign = -1.0 if chosen_by == "loss" else 1.0  # trajectories hold "higher is better" values
    written = []

    trajectory = report.get("trajectory") or []
    if trajectory:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        scored = [(t["step"], sign * t["score"]) for t in trajectory if t["score"] is not None]
        ax.plot(*zip(*scored), color="0.6", zorder=1)
        for accepted, color, label in ((True, "tab:green", "kept"), (False, "tab:red", "rejected")):
            points = [(t["step"], sign * t["score"]) for t in trajectory
                      if t["accepted"] == accepted and t["score"] is not None]  # fmt: skip
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
        ax.set_title(f"{report['recipe']['pretty_name']}: trajectory")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "trajectory.png", dpi=100)
        plt.close(fig)
        written.append(f"{folder.name}/trajectory.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    candidates = report["candidates"]
    ax.scatter(
        [selection_score(c, chosen_by) for c in candidates],
        [_first_report(c, metric) for c in candidates],
        c=["tab:green" if c["kept"] else "tab:gray" for c in candidates],
        label="candidates (green: in the soup)",
    )
    for key, marker in (("uniform", "s"), ("soup", "*")):
        entry = report[key]
        ax.scatter(
            selection_score(entry, chosen_by),
            _first_report(entry, metric),
            marker=marker,
            s=150,
            label=entry["name"],
        )
    ax.set_xlabel(f"selection {chosen_by}")
    ax.set_ylabel(f"report {metric}")
    ax.set_title("Candidates and soups")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(folder / "candidates.png", dpi=100)
    plt.close(fig)
    written.append(f"{folder.name}/candidates.png")
    return written
