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

    curve = (report.get("wise") or {}).get("curve") or []
    if len(curve) > 1:
        write_wise_curve(folder / "wise.png", curve, metric, chosen_by)
        written.append(f"{folder.name}/wise.png")
    if report.get("diagnostics") and len(report["diagnostics"]["ids"]) > 1:
        write_angle_heatmap(folder / "angles.png", report["diagnostics"])
        written.append(f"{folder.name}/angles.png")
    return written


def write_wise_curve(path: Path, curve: list[dict], metric: str, chosen_by: str) -> None:
    """Selection and report scores of each WiSE-FT alpha (0 = the base's body, 1 = the fine-tuned soup)."""
    alphas = [point["alpha"] for point in curve]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(
        alphas, [selection_score(p, chosen_by) for p in curve], marker="o", label=f"selection {chosen_by}"
    )
    ax.set_xlabel("alpha (weight of the fine-tuned soup)")
    ax.set_ylabel(f"selection {chosen_by}")
    right = ax.twinx()
    for split in curve[0]["report"]:
        right.plot(alphas, [p["report"][split][metric] for p in curve], marker="s", color="tab:orange",
                   label=f"{split} {metric}")  # fmt: skip
    right.set_ylabel(f"report {metric}")
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize="small")
    ax.set_title("WiSE-FT: interpolating the base and the soup")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_angle_heatmap(path: Path, diagnostics: dict) -> None:
    """Pairwise angles (degrees) between the candidates' task vectors (θ_i − θ_base), as a heatmap."""
    angles = diagnostics["angle_degrees"]
    count = len(angles)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * count, 0.8 + 0.6 * count))
    image = ax.imshow(angles, vmin=0, vmax=max(90.0, *(max(r) for r in angles)), cmap="viridis")
    labels = [f"#{i + 1}" for i in range(count)]
    ax.set_xticks(range(count), labels)
    ax.set_yticks(range(count), labels)
    if count <= 16:
        for i in range(count):
            for j in range(count):
                ax.text(j, i, f"{angles[i][j]:.0f}", ha="center", va="center", color="w", fontsize="small")
    fig.colorbar(image, ax=ax, label="angle between task vectors (degrees)")
    ax.set_title("Fine-tuning directions")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
