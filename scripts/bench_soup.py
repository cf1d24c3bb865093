"""Benchmark: building a uniform soup of N BERT-base-sized models with hf-soup's materializer.

For N = 2, 4, 8 (110M parameters each, fp32, saved as safetensors), measured in the same run:
- wall time of `hf_soup.merge.materialize.materialize`;
- the raw I/O floor: reading every input byte once and writing one model-sized output;
- peak anonymous RSS (`RssAnon` sampled from /proc/self/status every 10 ms). Memory-mapped safetensors pages
  are file-backed (`RssFile`) page cache, which the kernel can drop at will, so they are reported apart.

Each measurement runs in a fresh subprocess. The page cache is warm for both the floor and hf-soup (the inputs
were just written or read); the two are measured alternately on the same files.

    python scripts/bench_soup.py                  # N = 2 4 8; about 4 GB of scratch disk
    python scripts/bench_soup.py --sizes 2 4 --scratch /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def make_models(folder: Path, count: int) -> list[Path]:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    config = BertConfig(num_labels=2)  # bert-base: 12 layers, hidden 768, vocab 30522
    if not (folder / "base" / "config.json").exists():
        torch.manual_seed(0)
        BertModel(config).save_pretrained(folder / "base")
    paths = []
    for index in range(count):
        path = folder / f"ft-{index}"
        if not (path / "model.safetensors").exists():
            torch.manual_seed(index + 1)
            BertForSequenceClassification(config).save_pretrained(path)
        paths.append(path)
    return paths


class AnonPeak:
    """Samples RssAnon and RssFile of this process in a thread."""

    def __init__(self):
        self.anon = self.file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self):
        fields = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024
        return fields.get("RssAnon", 0), fields.get("RssFile", 0)

    def _run(self):
        while not self._stop.is_set():
            anon, file = self._read()
            self.anon, self.file = max(self.anon, anon), max(self.file, file)
            time.sleep(0.01)

    def __enter__(self):
        self.baseline = self._read()[0]
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def child_soup(folder: Path, count: int, out: Path) -> dict:
    from hf_soup.candidates.compat import check_compatibility
    from hf_soup.merge.materialize import materialize
    from hf_soup.mixture import Mixture

    ids = [str(folder / f"ft-{i}") for i in range(count)]
    _report, sources = check_compatibility(folder / "base", ids)
    with AnonPeak() as peak:
        started = time.perf_counter()
        materialize(Mixture.uniform("uniform", ids), sources, out, quiet=True)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "anon_peak": peak.anon - peak.baseline, "file_peak": peak.file}


def child_floor(folder: Path, count: int, out: Path) -> dict:
    """Read every input byte once; write one model-sized file."""
    chunk = 64 * 1024 * 1024
    with AnonPeak() as peak:
        started = time.perf_counter()
        for i in range(count):
            with open(folder / f"ft-{i}" / "model.safetensors", "rb") as handle:
                while data := handle.read(chunk):
                    last = data
        size = (folder / "ft-0" / "model.safetensors").stat().st_size
        with open(out / "model.safetensors", "wb") as handle:
            written = 0
            while written < size:
                block = last[: min(chunk, size - written)]
                handle.write(block)
                written += len(block)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "anon_peak": peak.anon - peak.baseline, "file_peak": peak.file}


def run_child(kind: str, folder: Path, count: int) -> dict:
    out = Path(tempfile.mkdtemp(dir=folder))
    try:
        result = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                kind,
                "--scratch",
                str(folder),
                "--n",
                str(count),
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument(
        "--scratch", default=None, help="folder for the models (default: a temp folder, removed)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs of each measurement; the fastest counts")
    parser.add_argument("--child", choices=["soup", "floor"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        function = child_soup if args.child == "soup" else child_floor
        print(json.dumps(function(Path(args.scratch), args.n, Path(args.out))))
        return 0

    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="hf-soup-bench-"))
    try:
        make_models(scratch, max(args.sizes))
        model_bytes = (scratch / "ft-0" / "model.safetensors").stat().st_size
        print(
            f"one model: {model_bytes / 1e6:.0f} MB (bert-base, fp32); {os.cpu_count()} CPUs; warm page cache"
        )
        print(
            f"{'N':>2}  {'soup s':>7}  {'floor s':>7}  {'time/floor':>10}  {'anon peak':>10}  {'anon/model':>10}  "
            f"{'file-backed peak':>16}"
        )
        summary = []
        for count in args.sizes:
            soups, floors = [], []
            for _ in range(args.repeats):  # alternate, so both see the same cache state
                floors.append(run_child("floor", scratch, count))
                soups.append(run_child("soup", scratch, count))
            soup = min(soups, key=lambda r: r["seconds"])
            floor = min(floors, key=lambda r: r["seconds"])
            ratio, anon_ratio = soup["seconds"] / floor["seconds"], soup["anon_peak"] / model_bytes
            summary.append((count, ratio, anon_ratio))
            print(
                f"{count:>2}  {soup['seconds']:>7.2f}  {floor['seconds']:>7.2f}  {ratio:>10.2f}  "
                f"{soup['anon_peak'] / 1e6:>8.0f}MB  {anon_ratio:>10.2f}  {soup['file_peak'] / 1e6:>14.0f}MB"
            )
        worst_time = max(r for _, r, _ in summary)
        worst_memory = max(m for _, _, m in summary)
        spread = max(m for _, _, m in summary) - min(m for _, _, m in summary)
        print(
            f"SUMMARY: time at most {worst_time:.2f}x the I/O floor (target 1.3x); anonymous peak at most "
            f"{worst_memory:.2f}x one model (target 2x), varying by {spread:.2f}x across N={args.sizes}."
        )
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
