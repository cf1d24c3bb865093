"""Benchmark: one process against `accelerate launch --num_processes N` for the same greedy soup.

Runs the same `hf-soup` command (fresh score cache each time) as `python -m hf_soup` and under
`accelerate launch --num_processes N --cpu` (or on GPUs with `--gpu`), then prints the wall times, their ratio,
and whether the two runs chose the same mixture, got the same scores and wrote the same tensors.

On a CPU machine the processes share its cores (each gets cores / N threads), so expect little speed-up there;
on N GPUs the scoring passes split N ways.

    python scripts/bench_distributed.py             # 1 vs 2 CPU processes

The candidates are `--runs` (e.g. `results/runs` from `scripts/reproduce_fine_foods.py`), or else a short sweep of
`--variants` MiniLM fine-tunes made first (as `scripts/bench_greedy.py` makes them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(command: list[str], env: dict) -> tuple[float, dict]:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(result.stderr[-2000:])
    return time.perf_counter() - started, json.loads(result.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", default=None, help="folder with start/ and v*/ (default: a fresh sweep)")
    parser.add_argument("--variants", type=int, default=4, help="fine-tunes to make when --runs is not given")
    parser.add_argument("--train-rows", type=int, default=128, help="rows each of those fine-tunes sees")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument(
        "--max-eval-examples", type=int, default=None, help="examples per split (default: all)"
    )
    parser.add_argument("--max-length", type=int, default=128, help="tokens per review")
    parser.add_argument("--gpu", action="store_true", help="one process per GPU instead of CPU processes")
    args = parser.parse_args()
    from bench_greedy import candidates_of

    data = ROOT / "hf_soup" / "data" / "fine_foods"
    work = Path(tempfile.mkdtemp(prefix="hf-soup-bench-dist-"))
    threads = os.cpu_count() or 1
    try:
        args.selection_fraction = 0.3  # the carve-out the soup selects on, held out of the sweep too
        start, candidates = candidates_of(args, str(data / "train.csv"), work)
        soup = [
            "--base",
            start,
            "--candidates",
            *candidates,
            "--dataset",
            str(data / "train.csv"),
            "--report-split",
            str(data / "test.csv"),
            "--text-column",
            "review",
            "--label-column",
            "score",
            "--selection-fraction",
            "0.3",
            "--recipe",
            "greedy",
            "--format",
            "json",
            "--quiet",
            "--max-length",
            str(args.max_length),
        ]
        if args.max_eval_examples:
            soup += ["--max-eval-examples", str(args.max_eval_examples)]
        env = {**os.environ, "HF_SOUP_CACHE": str(work / "cache-1"), "OMP_NUM_THREADS": str(threads)}
        one_time, one = run([sys.executable, "-m", "hf_soup", *soup, "--output", str(work / "one")], env)
        launch = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            str(args.processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ]
        launch.append("--multi_gpu")  # accelerate's torchrun launcher; `--cpu` alone would start one process
        per_process = str(max(1, threads // args.processes) if not args.gpu else threads)
        env = {**os.environ, "HF_SOUP_CACHE": str(work / "cache-n"), "OMP_NUM_THREADS": per_process}
        if not args.gpu:
            env["ACCELERATE_USE_CPU"] = "1"
        many_time, many = run([*launch, "-m", "hf_soup", *soup, "--output", str(work / "many")], env)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if many["processes"] != args.processes:
        sys.exit(f"the launch ran {many['processes']} process(es), not {args.processes}")
    same_mixture = one["mixture"]["ingredients"] == many["mixture"]["ingredients"]
    same_tensors = one["tensor_sha256"] == many["tensor_sha256"]
    worst = max(
        abs(a["selection_loss"] - b["selection_loss"]) for a, b in zip(one["candidates"], many["candidates"])
    )
    where = f"{args.processes} GPUs" if args.gpu else f"{args.processes} CPU processes on {threads} cores"
    print(f"1 process: {one_time:.1f} s   {where}: {many_time:.1f} s   ratio {many_time / one_time:.2f}x")
    print(
        f"same mixture: {same_mixture}; same output tensors: {same_tensors}; "
        f"largest selection-loss difference: {worst:.2e}"
    )
    return 0 if same_mixture and same_tensors else 1


if __name__ == "__main__":
    sys.exit(main())
