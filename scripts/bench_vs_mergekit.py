"""Benchmark: a plain uniform merge of N BERT-base fp32 fine-tunes, hf-soup against `mergekit-yaml` (linear).

Both are run as users run them (the CLI, in a fresh process), alternating, `--rounds` times per N, in one run:
- wall time (median of the rounds) and the ratio hf-soup / mergekit, for hf-soup's first run on the inputs
  (nothing cached: it verifies every input in the merge's own read of it) and for a rerun (verdicts cached);
- peak RSS (maximum resident set size, from `getrusage`, as `/usr/bin/time -v` reports it) and its ratio;
- the largest absolute difference between the two outputs (0, or float32 rounding).

The candidates are the base plus small seeded noise (fine-tune-like: hf-soup's diagnostics accept them).
mergekit is installed into its own venv (never a dependency of hf-soup), reusing this interpreter's torch.

    python scripts/bench_vs_mergekit.py                    # N = 4 8, 3 rounds; about 4 GB of scratch disk
    python scripts/bench_vs_mergekit.py --sizes 4 --rounds 5 --scratch /tmp/bench
"""

from __future__ import annotations

import argparse
import fcntl
import site
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def make_family(folder: Path, count: int) -> tuple[Path, list[Path]]:
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    config = BertConfig(num_labels=2)  # bert-base: 12 layers, hidden 768, vocab 30522
    torch.manual_seed(0)
    base = BertModel(config)
    if not (folder / "base" / "config.json").exists():
        base.save_pretrained(folder / "base")
    start = BertForSequenceClassification(config)
    start.bert.load_state_dict(base.state_dict())
    paths = []
    for index in range(count):
        path = folder / f"ft-{index}"
        if not (path / "model.safetensors").exists():
            noise = torch.Generator().manual_seed(index + 1)
            model = BertForSequenceClassification(config)
            model.load_state_dict(
                {
                    k: v + 1e-3 * torch.randn(v.shape, generator=noise) if v.is_floating_point() else v
                    for k, v in start.state_dict().items()
                }
            )
            model.save_pretrained(path)
        paths.append(path)
    return folder / "base", paths


def mergekit(venv: Path) -> Path:
    """`mergekit-yaml` in its own venv, installed once: under a lock, since the comparison scripts may run at the
    same time (the test suite's two workers) and share the venv."""
    script = venv / "bin" / "mergekit-yaml"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{venv}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not script.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            # This interpreter's packages, torch among them, are on the venv's path (a .pth file), so pip installs
            # only what mergekit adds: never a second torch (from a venv, `--system-site-packages` would see the
            # base interpreter's packages instead, and pip would fetch a multi-GB CUDA build of torch).
            version = f"python{sys.version_info.major}.{sys.version_info.minor}"
            packages = venv / "lib" / version / "site-packages"
            (packages / "hf_soup_parent.pth").write_text("\n".join(site.getsitepackages()) + "\n")
            subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "mergekit"], check=True)
    return script


# Runs a command and prints its peak RSS in kB: getrusage(RUSAGE_CHILDREN) covers exactly the waited-for child
# (what `/usr/bin/time -v` reports, without needing that binary).
_PEAK = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)"
)


def timed(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of `command`."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _PEAK, *command], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{command[0]} failed:\n{result.stderr[-2000:]}")
    return seconds, int(result.stderr.rsplit(None, 1)[-1]) * 1024


def max_difference(ours: Path, theirs: Path) -> float:
    a, b = load_file(str(ours / "model.safetensors")), load_file(str(theirs / "model.safetensors"))
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def bench(scratch: Path, count: int, rounds: int, script: Path) -> dict:
    base, runs = make_family(scratch, count)
    models = "\n".join(f"  - model: {r}\n    parameters:\n      weight: 1.0" for r in runs)
    config = scratch / f"linear-{count}.yml"
    config.write_text(f"merge_method: linear\nmodels:\n{models}\ndtype: float32\n")
    ours_out, theirs_out = scratch / f"hf-soup-{count}", scratch / f"mergekit-{count}"
    ours = [
        sys.executable,
        "-m",
        "hf_soup",
        "--base",
        str(base),
        "--candidates",
        *map(str, runs),
        "--recipe",
        "uniform",
        "--output",
        str(ours_out),
        "--overwrite",
        "--quiet",
    ]
    theirs = [str(script), str(config), str(theirs_out)]  # mergekit-yaml as its README shows it
    # hf-soup caches what it learns about its inputs (fingerprints, diagnostics): a first run reads every input
    # to verify it; a rerun on unchanged checkpoints does not. Both are timed, each round.
    warm = [*ours, "--cache-dir", str(scratch / "cache-warm")]
    subprocess.run(warm, check=True, capture_output=True)  # fills the warm cache, untimed
    times: dict[str, list] = {"first run": [], "rerun": [], "mergekit": []}
    for round_ in range(rounds):  # alternating, so drift on a noisy machine hits all three
        cold = [*ours, "--cache-dir", str(scratch / f"cache-{count}-{round_}")]
        for name, command in (("first run", cold), ("rerun", warm), ("mergekit", theirs)):
            times[name].append(timed(command))
    return {
        "n": count,
        "seconds": {k: statistics.median(t for t, _ in v) for k, v in times.items()},
        "peak_rss": {k: max(p for _, p in v) for k, v in times.items()},
        "max_abs_difference": max_difference(ours_out, theirs_out),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scratch", type=Path, default=None)
    parser.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "hf-soup-mergekit")
    args = parser.parse_args()
    script = mergekit(args.venv)
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        rows = [bench(Path(scratch), n, args.rounds, script) for n in args.sizes]
    print(
        f"{'N':>3}  {'hf-soup':>10}  {'seconds':>7}  {'mergekit s':>10}  {'time ratio':>10}  {'RSS':>7}  "
        f"{'mergekit RSS':>12}  {'RSS ratio':>9}  max |diff|"
    )
    for r in rows:
        s, m = r["seconds"], r["peak_rss"]
        for run in ("first run", "rerun"):
            print(
                f"{r['n']:>3}  {run:>10}  {s[run]:>7.2f}  {s['mergekit']:>10.2f}  {s[run] / s['mergekit']:>10.2f}  "
                f"{m[run] / 1e9:>5.2f}GB  {m['mergekit'] / 1e9:>10.2f}GB  {m[run] / m['mergekit']:>9.2f}  "
                f"{r['max_abs_difference']:.3g}"
            )


if __name__ == "__main__":
    main()
