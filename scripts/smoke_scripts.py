"""Smoke run of every script under `scripts/`, at a small size, from a plain clone (no `../shared`).

Copies the repository's tracked files into a scratch folder with no `shared/` beside it, so each script sees what a
user who cloned hf-soup and ran the README's install sees, then runs each one with the arguments below (only
sizes are shrunk; data sources, models and code paths are the defaults) and prints one line per script. Exits
non-zero if any script fails, or if a script has no entry here. `tests/test_scripts.py` runs the same, one test per
script.

    python scripts/smoke_scripts.py                 # all scripts; about 7 minutes on 2 CPU cores
    python scripts/smoke_scripts.py bench_eval bench_greedy
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Per script: its arguments at smoke size. `{scratch}` is a fresh folder per script.
SMALL = {
    "bench_distributed": "--variants 2 --train-rows 32 --max-eval-examples 64 --max-length 32",
    "bench_eval": "--examples 32",
    "bench_eval_images": "--examples 64",
    "bench_greedy": "--variants 2 --train-rows 32 --scratch {scratch}",
    "bench_learned_memory": "--n 2 --steps 1",
    "bench_llm_scale": "--size tiny --sizes 2 --rounds 1 --scratch {scratch}",
    "bench_mixing": "--candidates 2 --examples 16",
    "bench_soup": "--sizes 2 --repeats 1 --scratch {scratch}",
    "bench_vs_mergekit": "--sizes 2 --rounds 1 --scratch {scratch}",
    "reproduce_backbone_soups": "--workdir {scratch}/work --results {scratch} --pool-rows 600 --pretrain-rows 300 "
    "--test-rows 60 --digits-rows 100 --review-rows 32 --text-steps 1 --target-rows 400 --report-rows 96",
    "compare_stock_mergekit": "--candidates 2",
    "compare_methods_mergekit": "--bert-size tiny --methods ties,slerp --seeds 2",
    "reproduce_fashion_mnist": "--workdir {scratch}/work --results {scratch} --pool-rows 300 --pretrain-rows 300 "
    "--pretrain-epochs 1 --test-rows 200 --variants 2 --recalibrate-bn 2",
    "reproduce_fine_foods": "--workdir {scratch}/runs --results {scratch} --variants 2 --train-rows 32 "
    "--max-length 32 --selection-fraction 0.05 --max-eval-examples 32",
    "reproduce_llm_soup": "--workdir {scratch}/runs --results {scratch} --full 2 --lora 1 --steps 2 --train-docs 16 "
    "--selection-docs 8 --report-docs 8 --max-length 16 --recipes greedy",
    "trainer_sweep": "--trials 2 --steps 2 --eval-rows 32 --workdir {scratch}",
}


def plain_clone(folder: Path) -> Path:
    """The tracked files of this repository, copied to `folder/hf-soup` (no `shared/` beside it)."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    clone = folder / "hf-soup"
    for name in files.splitlines():
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    return clone


def run(clone: Path, name: str, scratch: Path) -> subprocess.CompletedProcess:
    """Run `scripts/<name>.py` of `clone` at its smoke size, in `clone`, with `scratch` as its scratch folder."""
    command = [
        sys.executable,
        str(clone / "scripts" / f"{name}.py"),
        *SMALL[name].format(scratch=scratch).split(),
    ]
    return subprocess.run(command, cwd=clone, capture_output=True, text=True)


def scripts() -> list[str]:
    """Every script under `scripts/` (a file that runs as `__main__`; `fashion_mnist.py` is a helper they import)."""
    found = []
    for path in (ROOT / "scripts").glob("*.py"):
        if path.stem != Path(__file__).stem and 'if __name__ == "__main__"' in path.read_text():
            found.append(path.stem)
    return sorted(found)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("only", nargs="*", help="script names (default: all)")
    args = parser.parse_args()
    missing = [s for s in scripts() if s not in SMALL]
    if missing:
        print(f"no smoke-size arguments for: {', '.join(missing)} (add them to SMALL)", file=sys.stderr)
        return 2
    failed = []
    with tempfile.TemporaryDirectory(prefix="hf-soup-smoke-") as scratch_root:
        clone = plain_clone(Path(scratch_root))
        for name in args.only or scripts():
            scratch = Path(tempfile.mkdtemp(dir=scratch_root))
            started = time.perf_counter()
            result = run(clone, name, scratch)
            seconds = time.perf_counter() - started
            last = (result.stdout.strip().splitlines() or [""])[-1][:140]
            print(
                f"{'ok  ' if result.returncode == 0 else 'FAIL'} {name:<24} {seconds:6.1f}s  {last}",
                flush=True,
            )
            if result.returncode != 0:
                failed.append(name)
                print(result.stderr[-3000:], file=sys.stderr)
            shutil.rmtree(scratch, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
