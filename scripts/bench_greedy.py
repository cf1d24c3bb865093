"""Benchmark: what a greedy soup costs.

On N fine-tuned MiniLM candidates (`results/runs/v*` from `scripts/reproduce_fine_foods.py`), measured in the
same run, each with a fresh score cache unless said otherwise:
- model evaluations on the selection split (target: at most 2N − 1: N singles, N − 1 trials);
- the selection-split time against (2N − 1) × one evaluation (the median single-candidate evaluation);
- exact early rejection: examples forwarded with and without it (same mixture);
- a rerun with a warm score cache: its wall time against the first run's (target: at most 10%).

    python scripts/bench_greedy.py [--runs results/runs] [--max-eval-examples 300] [--selection-metric accuracy]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "fine_food_reviews"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", default=str(ROOT / "results" / "runs"))
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--max-eval-examples", type=int, default=300)
    parser.add_argument("--selection-metric", default="accuracy")
    args = parser.parse_args()

    from hf_soup import SoupConfig, cook

    runs = Path(args.runs)
    candidates = sorted(str(p) for p in runs.glob("v*") if (p / "model.safetensors").exists())
    if len(candidates) < 2:
        print(
            f"Need fine-tuned candidates in {runs}: run scripts/reproduce_fine_foods.py first.",
            file=sys.stderr,
        )
        return 2
    n = len(candidates)

    def run(cache: str, early: bool) -> tuple[dict, float]:
        config = SoupConfig(
            base=str(runs / "start"), candidates=candidates, dataset=str(Path(args.data) / "train.csv"),
            report_split=str(Path(args.data) / "test.csv"), text_column="review", label_column="score",
            recipe="greedy", selection_fraction=0.15, max_eval_examples=args.max_eval_examples,
            selection_metric=args.selection_metric, no_early_rejection=not early, cache_dir=cache,
        )  # fmt: skip
        started = time.perf_counter()
        report = cook(config, quiet=True).report
        return report, time.perf_counter() - started

    caches = tempfile.mkdtemp(prefix="hf-soup-bench-greedy-")
    full, _full_seconds = run(f"{caches}/full", early=False)
    early, early_seconds = run(f"{caches}/early", early=True)
    warm, warm_seconds = run(f"{caches}/early", early=True)

    def selection(report):
        return [p for p in report["cache"]["forward_passes"] if p["split"] == "selection"]

    # Greedy's own passes: N singles, then N - 1 trials; the one after them scores the uniform soup for the table.
    passes = selection(full)[: 2 * n - 1]
    singles = passes[:n]
    one = statistics.median(p["seconds"] for p in singles)
    evaluations = len(passes)
    selection_seconds = sum(p["seconds"] for p in passes)
    forwarded_full = sum(p["examples"] for p in passes)  # greedy's passes only, in both runs
    forwarded_early = sum(p["examples"] for p in selection(early)[: 2 * n - 1])
    assert early["mixture"] == full["mixture"], "early rejection changed the soup"

    print(f"{n} candidates; selection split {full['splits']['selection']['size']} examples; "
          f"selection metric {args.selection_metric}; kept {len(full['mixture']['ingredients'])}")  # fmt: skip
    print(f"greedy's selection evaluations: {evaluations} (target <= 2N-1 = {2 * n - 1}); the table's uniform-soup "
          "row costs one more")  # fmt: skip
    print(f"selection time: {selection_seconds:.1f}s = {selection_seconds / ((2 * n - 1) * one):.2f}x "
          f"(2N-1) x one evaluation ({one:.2f}s)")  # fmt: skip
    print(f"early rejection: {forwarded_early} examples forwarded vs {forwarded_full} without "
          f"({forwarded_early / forwarded_full:.2f}x; {early['cache']['early_stops']} trials stopped early; "
          "same soup)")  # fmt: skip
    print(f"warm-cache rerun: {warm_seconds:.1f}s vs {early_seconds:.1f}s ({warm_seconds / early_seconds:.2%}; "
          f"target <= 10%); evaluations on rerun: {warm['cache']['evaluations']}")  # fmt: skip
    print(f"SUMMARY: evaluations {evaluations}/{2 * n - 1}; time {selection_seconds / ((2 * n - 1) * one):.2f}x "
          f"(2N-1) evals; early rejection forwards {forwarded_early / forwarded_full:.2f}x the examples; "
          f"warm rerun {warm_seconds / early_seconds:.2%} of the first")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
