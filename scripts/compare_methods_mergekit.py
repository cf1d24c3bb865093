"""Do hf-soup's task arithmetic, TIES and SLERP write mergekit's tensors, from the same mergekit YAML, and do its
`linear` and `model_stock` mappings (to `uniform` and `stock`)? And does DARE drop and rescale as the paper says?

Two families, each a base and three fine-tunes (task vectors that share a direction plus their own noise):
- BERT (`--bert-size base`: bert-base's shape) in float32, the base shipping the classifier head;
- a small Llama in bfloat16, sharded, with tied embeddings.

For each of those methods it writes one mergekit YAML, runs `hf-soup --mergekit-config` and
`mergekit-yaml` on it, and prints the largest difference over all tensors (relative to each tensor's largest
magnitude) and the fraction of entries that differ at all. mergekit runs with `dtype: float32` (its arithmetic in
float32, as hf-soup's always is); the Llama family is written both in float32 and in bfloat16 (`out_dtype`), where an
entry whose two float32 values straddle a bf16 rounding boundary differs by one bf16 step.

SLERP's angle comes from sums over each tensor: mergekit takes them in float32 (in blocks of 1M entries), hf-soup
in float64, so on large tensors the two differ by mergekit's rounding of the angle. Each is therefore also measured
against a float64 SLERP of the same inputs written here.

DARE's random masks cannot be matched, so for dare_linear (one model given weight 1, float32 output) it checks:
the kept fraction against `density` (with its 99.9% binomial interval), that each kept entry is τ/density within one
float32 ulp (of the larger of the written value and τ/density: the two float32 roundings), and that the mean of K seeded soups converges to the undropped task arithmetic
(its RMS error against K: it should fall as 1/√K).

mergekit is installed into its own venv (never a dependency of hf-soup), reusing this interpreter's torch.

    python scripts/compare_methods_mergekit.py                     # bert-base size; a few minutes
    python scripts/compare_methods_mergekit.py --bert-size tiny    # seconds
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from bench_vs_mergekit import mergekit  # mergekit-yaml in its own venv (this folder is on sys.path)
from safetensors.torch import load_file

BERT_SIZES = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
}
METHODS = {  # method: (its parameters, per-model parameters, how many fine-tunes)
    "task_arithmetic": ({"lambda": 0.8}, [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}], 3),
    "ties": (
        {},
        [{"weight": 0.5, "density": 0.5}, {"weight": 0.3, "density": 0.3}, {"weight": 1.0, "density": 0.7}],
        3,
    ),
    "slerp": ({"t": 0.3}, [{}, {}], 2),
    # The YAML mappings of hf-soup's own recipes: `linear` with equal weights is `uniform`; `model_stock` is `stock`.
    "linear": ({}, [{"weight": 1.0}, {"weight": 1.0}, {"weight": 1.0}], 3),
    "model_stock": ({}, [{}, {}, {}], 3),
}


def perturbed(state: dict, index: int, scale: float) -> dict:
    shared, noise = torch.Generator().manual_seed(100), torch.Generator().manual_seed(index)
    return {
        k: (
            v.float()
            + scale * (torch.randn(v.shape, generator=shared) + torch.randn(v.shape, generator=noise))
        ).to(v.dtype)
        if v.is_floating_point()
        else v
        for k, v in state.items()
    }


def bert_family(root: Path, size: str) -> list[Path]:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=30522 if size == "base" else 1000, num_labels=3, **BERT_SIZES[size])
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    model.save_pretrained(root / "base")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    paths = [root / "base"]
    for index in range(3):
        model.load_state_dict(perturbed(state, index + 1, 0.01))
        model.save_pretrained(root / f"ft-{index}")
        paths.append(root / f"ft-{index}")
    return paths


def llama_family(root: Path) -> list[Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=4096,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(root / "base", max_shard_size="2MB")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    paths = [root / "base"]
    for index in range(3):
        model.load_state_dict(perturbed(state, index + 1, 1e-2))
        model.save_pretrained(root / f"ft-{index}", max_shard_size="2MB")
        paths.append(root / f"ft-{index}")
    return paths


def merge_yaml(method: str, paths: list[Path], out_dtype: str) -> str:
    parameters, per_model, count = METHODS[method]
    base, runs = paths[0], paths[1 : 1 + count]
    if method == "slerp":  # SLERP's base_model is its t = 0 end: the first fine-tune
        base = runs[0]
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    if method == "linear":  # mergekit's linear merges base_model too, and asks for its weight
        runs, per_model = [base, *runs], [{"weight": 1.0}, *per_model]
    for run, params in zip(runs, per_model, strict=True):
        lines.append(f"  - model: {run}")
        if params:
            lines.append(f"    parameters: {params}")
    if parameters:
        lines.append(f"parameters: {parameters}")
    lines += ["dtype: float32", f"out_dtype: {out_dtype}"]
    return "\n".join(lines) + "\n"


def weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def relative_error(ours: dict, reference: dict) -> tuple[float, str]:
    """The largest |ours − reference| over all tensors, relative to each tensor's max |reference|, and where."""
    worst = (0.0, "")
    for name in sorted(set(ours) & set(reference)):
        if ours[name].is_floating_point():
            delta = float((ours[name].double() - reference[name].double()).abs().max())
            worst = max(worst, (delta / (float(reference[name].abs().max()) or 1.0), name))
    return worst


def bf16_steps(ours: dict, theirs: dict) -> float:
    """The largest |ours − theirs| of a bf16 tensor in bf16 steps at that tensor's largest magnitude (the step
    of a value near zero is far smaller: there, a difference of float32 rounding is many of its steps)."""
    worst = 0.0
    for name in set(ours) & set(theirs):
        if ours[name].dtype == torch.bfloat16:
            largest = max(float(ours[name].abs().max()), float(theirs[name].abs().max()))
            step = 2.0 ** (math.floor(math.log2(largest)) - 7) if largest else 1.0
            worst = max(worst, float((ours[name].double() - theirs[name].double()).abs().max()) / step)
    return worst


def difference(ours: dict, theirs: dict) -> tuple[float, float, float, str]:
    """Over the tensors both wrote: the largest |ours − theirs| relative to the tensor's max |value|, the fraction
    of entries that differ at all, the largest difference in bf16 steps (bf16 outputs), and where."""
    missing = sorted(set(ours) ^ set(theirs))
    if missing:
        print(f"  tensors in only one output: {missing[:3]}")
    differing = total = 0
    for name in set(ours) & set(theirs):
        if ours[name].is_floating_point():
            differing += int((ours[name] != theirs[name]).sum())
            total += ours[name].numel()
    relative, name = relative_error(ours, theirs)
    return relative, differing / total, bf16_steps(ours, theirs), name


def exact_slerp(a: dict, b: dict, t: float) -> dict:
    """SLERP of each tensor in float64 from float32 inputs (linear where |cos Ω| > 0.9995): the reference both
    tools are measured against, since each sums a float32 angle differently."""
    out = {}
    for name, x in a.items():
        x, y = x.double(), b[name].double()
        nx, ny = float(x.norm()), float(y.norm())
        cos = max(
            -1.0, min(1.0, float((x * y).sum()) / ((nx if nx > 1e-8 else 1.0) * (ny if ny > 1e-8 else 1.0)))
        )
        if abs(cos) > 0.9995:
            out[name] = (1 - t) * x + t * y
        else:
            omega = math.acos(cos)
            out[name] = (math.sin((1 - t) * omega) * x + math.sin(t * omega) * y) / math.sin(omega)
    return out


def exact_stock(base: dict, runs: list[dict]) -> dict:
    """Model Stock of each tensor in float64 from float32 inputs: t = N·cos / (1 + (N − 1)·cos), cos the mean pairwise
    cosine of the task vectors in that tensor, clamped to [0, 1]; θ = t·mean(θ_i) + (1 − t)·θ_base."""
    out, count = {}, len(runs)
    for name, anchor in base.items():
        if not anchor.is_floating_point():
            continue
        anchor = anchor.double()
        models = [run[name].double() for run in runs]
        deltas = [m - anchor for m in models]
        cosines = [
            float((deltas[i] * deltas[j]).sum()) / max(float(deltas[i].norm() * deltas[j].norm()), 1e-30)
            for i in range(count)
            for j in range(i + 1, count)
        ]
        cos = sum(cosines) / len(cosines)
        t = min(1.0, max(0.0, count * cos / (1 + (count - 1) * cos)))
        out[name] = t * sum(models) / count + (1 - t) * anchor
    return out


def run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{command[0]} failed:\n{done.stderr[-3000:]}")


def hf_soup(*args: str) -> list[str]:
    return [sys.executable, "-m", "hf_soup", *args, "--quiet"]


def compare(
    root: Path, family: str, paths: list[Path], script: Path, out_dtype: str, methods: list[str]
) -> list[tuple]:
    rows = []
    for method in methods:
        config = root / f"{family}-{method}-{out_dtype}.yml".replace(" ", "_").replace(",", "")
        config.write_text(merge_yaml(method, paths, out_dtype))
        ours, theirs = config.with_suffix(".hf-soup"), config.with_suffix(".mergekit")
        run(hf_soup("--mergekit-config", str(config), "--output", str(ours)))
        run([str(script), str(config), str(theirs)])
        row = (family, out_dtype, method, *difference(weights(ours), weights(theirs)))
        exact = None
        if method == "slerp" and out_dtype == "float32":
            first, second = (weights(path) for path in paths[1:3])
            exact = exact_slerp(first, second, METHODS["slerp"][0]["t"])
        if method == "model_stock" and out_dtype == "float32":
            exact = exact_stock(weights(paths[0]), [weights(path) for path in paths[1:4]])
        if exact is not None:
            row += (relative_error(weights(ours), exact)[0], relative_error(weights(theirs), exact)[0])
        rows.append(row)
    return rows


def dare_checks(root: Path, paths: list[Path], density: float, seeds: int) -> list[str]:
    """dare_linear with one model weighted 1: kept fraction, exact rescaling, and the mean over seeds; returns
    the checks that failed."""
    base, runs = paths[0], paths[1:3]
    common = ["--base", str(base), "--candidates", *map(str, runs), "--dtype", "float32"]
    reference = root / "dare-undropped"
    run(hf_soup(*common, "--recipe", "task_arithmetic", "--weights", "1,0", "--output", str(reference)))
    theta0 = {k: v.float() for k, v in weights(base).items()}
    tau = {k: v.float() - theta0[k] for k, v in weights(runs[0]).items() if v.is_floating_point()}
    expected = {k: v.double() for k, v in weights(reference).items() if k in tau}
    kept = total = 0
    worst_ulps, running, errors = 0.0, None, {}
    for seed in range(seeds):
        out = root / f"dare-{seed}"
        run(
            hf_soup(
                *common,
                "--recipe",
                "dare_linear",
                "--weights",
                "1,0",
                "--density",
                str(density),
                "--seed",
                str(seed),
                "--output",
                str(out),
            )
        )
        soup = {k: v for k, v in weights(out).items() if k in tau}
        for name, value in soup.items():
            delta = value.double() - theta0[name].double()
            moved = tau[name] != 0
            chosen = (value != theta0[name]) & moved
            if seed == 0:
                kept, total = kept + int(chosen.sum()), total + int(moved.sum())
                # Two float32 roundings: of τ/density, and of θ_0 + τ/density: one ulp of the larger of the two.
                rescaled = tau[name] / density
                larger = torch.maximum(value.abs(), rescaled.abs())
                spacing = torch.ldexp(torch.ones_like(value), torch.frexp(larger)[1] - 24).double()
                off = (delta - tau[name].double() / density).abs()[chosen] / spacing[chosen]
                worst_ulps = max(worst_ulps, float(off.max()) if off.numel() else 0.0)
        running = {k: (running[k] if running else 0) + v.double() for k, v in soup.items()}
        if seed + 1 in (1, 4, 16, 64) or seed + 1 == seeds:
            squared = sum(float(((running[k] / (seed + 1) - expected[k]) ** 2).sum()) for k in running)
            errors[seed + 1] = math.sqrt(squared / sum(v.numel() for v in running.values()))
    p = density
    half = 3.29 * math.sqrt(p * (1 - p) / total)  # 99.9% normal interval of a binomial fraction
    print(f"\nDARE (dare_linear, density {density}, one model, {total} moved entries, float32 output)")
    print(
        f"  kept fraction {kept / total:.5f}; density {p} ± {half:.5f} (99.9%): {'inside' if abs(kept / total - p) <= half else 'OUTSIDE'}"
    )
    print(f"  kept entries: θ − θ_0 vs τ/density differ by at most {worst_ulps:.2f} float32 ulps")
    print("  mean of K seeded soups vs undropped task arithmetic (RMS error; 1/√K would halve it per 4× K):")
    for count, error in errors.items():
        print(f"    K = {count:>3}: {error:.3e}   × √K = {error * math.sqrt(count):.3e}")
    failed = [] if abs(kept / total - p) <= half else ["DARE's kept fraction is outside its interval"]
    failed += [] if worst_ulps <= 1.5 else [f"DARE's kept entries are {worst_ulps:.2f} ulps from τ/density"]
    scaled = [error * math.sqrt(count) for count, error in errors.items()]
    failed += [] if max(scaled) <= 1.25 * min(scaled) else ["DARE's mean over seeds does not fall as 1/√K"]
    return failed


def failures(rows: list[tuple]) -> list[str]:
    """The targets: within float32 rounding of mergekit (1e-6 relative), or one bf16 step in bf16; for SLERP and
    Model Stock in float32, within float32 rounding of the float64 method (mergekit's own float32 angles are further
    off on large tensors)."""
    failed = []
    for family, out_dtype, method, relative, _, steps, _, *exact in rows:
        close = steps <= 1 if out_dtype == "bfloat16" else relative <= 1e-6
        if not close and not exact:
            failed.append(f"{method} on {family} ({out_dtype}) differs from mergekit by {relative:.3g}")
        if exact and exact[0] > 1e-6:
            failed.append(f"{method} on {family} is {exact[0]:.3g} from the float64 {method}")
    return failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bert-size", choices=sorted(BERT_SIZES), default="base")
    parser.add_argument("--seeds", type=int, default=16, help="DARE soups averaged for the convergence check")
    parser.add_argument("--density", type=float, default=0.3)
    parser.add_argument("--methods", default=",".join(METHODS), help="a comma-separated subset of these")
    parser.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "hf-soup-mergekit")
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    script = mergekit(args.venv)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "bert").mkdir()
        (root / "llama").mkdir()
        bert = bert_family(root / "bert", args.bert_size)
        rows = compare(root, f"bert-{args.bert_size} fp32", bert, script, "float32", methods)
        llama = llama_family(root / "llama")
        for out_dtype in ("float32", "bfloat16"):
            rows += compare(root, "llama bf16, tied, sharded", llama, script, out_dtype, methods)
        print(
            f"{'inputs':<26} {'written':<9} {'method':<16} {'max |Δ| / max |θ|':>18} {'entries differing':>18} "
            f"{'bf16 steps*':>11}  at"
        )
        for family, out_dtype, method, relative, fraction, steps, name, *_ in rows:
            print(
                f"{family:<26} {out_dtype:<9} {method:<16} {relative:>18.3g} {fraction:>18.2e} "
                f"{f'{steps:.2f}' if out_dtype == 'bfloat16' else '–':>11}  {name}"
            )
        print("* the largest difference in bf16 steps at the tensor's largest magnitude (bfloat16 outputs)")
        print(
            "\nSLERP and Model Stock against float64 ones of the same inputs (max |Δ| / max |θ|), float32 outputs:"
        )
        for row in rows:
            if len(row) > 7:
                print(f"  {row[0]:<26} {row[2]:<12} hf-soup {row[7]:.3g}   mergekit {row[8]:.3g}")
        failed = failures(rows) + dare_checks(root, llama, args.density, args.seeds)
    if failed:
        sys.exit("\nOff target: " + "; ".join(failed))
    print("\nAll on target.")


if __name__ == "__main__":
    main()
