"""Benchmark: a uniform soup of N synthetic Llama checkpoints in bf16 (sharded, tied embeddings), hf-soup against
`mergekit-yaml` (linear, bf16), as users run them: the CLI, in a fresh process, alternating, in one run.

The base is a Llama of `--size` (default `1b`: a TinyLlama-like 1.1 B parameters; `tiny` for a smoke run), saved in
bf16 in 1 GB shards with tied embeddings; the N "fine-tunes" are the base plus seeded noise. Printed per N:
- wall time of each (the median of `--rounds` rounds, alternating) and the ratio hf-soup / mergekit, for hf-soup's
  first run on the inputs (a fresh cache each round: it verifies every input in the same pass as the merge) and
  for a rerun (cached verdicts);
- peak anonymous RSS (`RssAnon`) and peak total RSS (`VmHWM`) of each process, sampled from /proc every 20 ms, and
  their ratios;
- the largest error of each output against the float64 average of the inputs, in bf16 ulps;
- bytes written (the output folder).

Each timed run starts with every input read once beforehand (`read_inputs`), as after a download: no run inherits
the page cache that the one before it left.

mergekit is installed into its own venv (never a dependency of hf-soup). Everything is written under `--scratch`
and removed at the end.

    python scripts/bench_llm_scale.py                       # 1b, N = 4 8, 3 rounds: about 25 GB of scratch disk
    python scripts/bench_llm_scale.py --size tiny --sizes 2 --rounds 1
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from bench_vs_mergekit import mergekit  # mergekit-yaml in its own venv (this folder is on sys.path)
from safetensors import safe_open

SIZES = {  # TinyLlama-1.1B's shape, and a small one for smoke runs
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "tiny": dict(
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
    ),
}


def make_family(folder: Path, size: str, count: int) -> list[Path]:
    """The base and `count` perturbed copies, bf16, 1 GB shards, tied embeddings (only `embed_tokens` stored)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SIZES[size], tie_word_embeddings=True, torch_dtype="bfloat16")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder / "base", max_shard_size="1GB")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    paths = []
    for index in range(count):
        noise = torch.Generator().manual_seed(index + 1)
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                if tensor.is_floating_point():
                    tensor.copy_(base[name].float() + 1e-3 * torch.randn(tensor.shape, generator=noise))
        paths.append(folder / f"ft-{index}")
        model.save_pretrained(paths[-1], max_shard_size="1GB")
    return paths


def peak_memory(pid: int, peaks: dict, stop: threading.Event) -> None:
    """Sample RssAnon and VmHWM (kB) of `pid` until `stop`."""
    status = Path(f"/proc/{pid}/status")
    while not stop.is_set():
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            break
        for key in ("RssAnon", "VmHWM"):
            if key in fields:
                peaks[key] = max(peaks.get(key, 0), int(fields[key].split()[0]) * 1024)
        stop.wait(0.02)


def read_inputs(folders: list[Path]) -> None:
    """Read every input file once, so that each timed run starts from the same page cache: at 8 x 1.1 B the inputs
    (20 GB) and mergekit's 8.8 GB peak do not fit in RAM together, and without this whichever run follows
    mergekit would read from disk what mergekit evicted."""
    buffer = bytearray(16 * 1024 * 1024)
    for path in sorted(p for folder in folders for p in folder.iterdir() if p.is_file()):
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


def timed(command: list[str]) -> tuple[float, dict]:
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks: dict = {}
    stop = threading.Event()
    sampler = threading.Thread(target=peak_memory, args=(process.pid, peaks, stop))
    sampler.start()
    _, stderr = process.communicate()
    stop.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{command[0]} failed:\n{stderr[-2000:]}")
    return time.perf_counter() - started, peaks


def tensors(folder: Path) -> dict[str, tuple[Path, str]]:
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            found.update({name: (path, name) for name in handle.keys()})
    return found


def error_in_ulps(output: Path, inputs: list[Path]) -> float:
    """The largest |output − float64 mean of the inputs|, in bf16 ulps of the mean, over every float tensor."""
    out, sources = tensors(output), [tensors(p) for p in inputs]
    worst = 0.0
    for name, (path, key) in out.items():
        with safe_open(str(path), "pt") as handle:
            written = handle.get_tensor(key).double()
        if not written.is_floating_point():
            continue
        total = torch.zeros_like(written)
        for source in sources:
            with safe_open(str(source[name][0]), "pt") as handle:
                total += handle.get_tensor(name).double()
        mean = total / len(sources)
        _, exponent = torch.frexp(mean)
        ulp = torch.ldexp(torch.ones_like(mean), exponent - 8)  # bf16: 8 significant bits
        worst = max(worst, float(((written - mean).abs() / ulp).max()))
    return worst


def bench(scratch: Path, family: Path, runs: list[Path], script: Path, rounds: int) -> dict:
    count = len(runs)
    models = "\n".join(f"  - model: {r}\n    parameters:\n      weight: 1.0" for r in runs)
    config = scratch / f"linear-{count}.yml"
    config.write_text(f"merge_method: linear\nmodels:\n{models}\ndtype: bfloat16\n")
    ours_out, theirs_out = scratch / f"hf-soup-{count}", scratch / f"mergekit-{count}"
    ours = [
        sys.executable,
        "-m",
        "hf_soup",
        "--base",
        str(family / "base"),
        "--candidates",
        *map(str, runs),
        "--recipe",
        "uniform",
        "--output",
        str(ours_out),
        "--overwrite",
        "--quiet",
    ]
    warm = [*ours, "--cache-dir", str(scratch / f"cache-{count}-warm")]
    subprocess.run(warm, check=True, capture_output=True)  # fills the rerun's cache, untimed
    runs_of: dict[str, list] = {"first run": [], "rerun": [], "mergekit": []}
    for round_ in range(rounds):  # alternating, so drift on a noisy machine hits all three
        cold = [*ours, "--cache-dir", str(scratch / f"cache-{count}-{round_}")]
        for name, command in (
            ("first run", cold),
            ("rerun", warm),
            ("mergekit", [str(script), str(config), str(theirs_out)]),
        ):
            read_inputs([family / "base", *runs])
            runs_of[name].append(timed(command))
    results = {
        name: (
            statistics.median(seconds for seconds, _ in measured),
            {key: max(peaks[key] for _, peaks in measured) for key in ("RssAnon", "VmHWM")},
        )
        for name, measured in runs_of.items()
    }
    written = {
        name: sum(p.stat().st_size for p in folder.glob("*") if p.is_file())
        for name, folder in (("hf-soup", ours_out), ("mergekit", theirs_out))
    }
    errors = {"hf-soup": error_in_ulps(ours_out, runs), "mergekit": error_in_ulps(theirs_out, runs)}
    shutil.rmtree(ours_out)
    shutil.rmtree(theirs_out)
    return {"n": count, "results": results, "written": written, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="1b")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scratch", type=Path, default=None)
    parser.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "hf-soup-mergekit")
    args = parser.parse_args()
    script = mergekit(args.venv)
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        family = Path(scratch) / "family"
        runs = make_family(family, args.size, max(args.sizes))  # N = 2 soups the first two, and so on
        rows = [bench(Path(scratch), family, runs[:n], script, args.rounds) for n in args.sizes]
    print(
        f"{'N':>3}  {'run':>9}  {'seconds':>7}  {'x mergekit':>10}  {'RssAnon':>8}  {'x':>5}  {'VmHWM':>7}  {'x':>5}  "
        f"{'max error':>9}  {'written':>8}"
    )
    for row in rows:
        theirs = row["results"]["mergekit"]
        for run, (seconds, peaks) in row["results"].items():
            tool = "mergekit" if run == "mergekit" else "hf-soup"
            print(
                f"{row['n']:>3}  {run:>9}  {seconds:>7.1f}  {seconds / theirs[0]:>10.2f}  "
                f"{peaks['RssAnon'] / 1e9:>6.2f}GB  {peaks['RssAnon'] / theirs[1]['RssAnon']:>5.2f}  "
                f"{peaks['VmHWM'] / 1e9:>5.2f}GB  {peaks['VmHWM'] / theirs[1]['VmHWM']:>5.2f}  "
                f"{row['errors'][tool]:>5.2f} ulp  {row['written'][tool] / 1e9:>6.2f}GB"
            )


if __name__ == "__main__":
    main()
