"""Does `hf-soup --recipe stock` compute what mergekit's `model_stock` computes, on the same inputs?

Builds a tiny BERT family (a base that ships the classifier head, and N fine-tunes whose task vectors share a
direction), merges it with both tools, and prints the largest difference per tensor kind. mergekit is installed
into its own venv (never a dependency of hf-soup), reusing this interpreter's torch.

    python scripts/compare_stock_mergekit.py [--candidates 3] [--venv /tmp/hf-soup-mergekit]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from bench_vs_mergekit import mergekit  # mergekit-yaml in its own venv (this folder is on sys.path)
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification


def build_family(root: Path, count: int) -> tuple[Path, list[Path]]:
    config = BertConfig(
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        num_labels=3,
    )
    torch.manual_seed(0)
    base = BertForSequenceClassification(config)
    base.save_pretrained(root / "base")
    shared = torch.Generator().manual_seed(100)
    direction = {k: torch.randn(v.shape, generator=shared) for k, v in base.state_dict().items()}
    runs = []
    for index in range(count):
        noise = torch.Generator().manual_seed(index)
        state = {
            k: v + 0.01 * (direction[k] + torch.randn(v.shape, generator=noise))
            if v.is_floating_point()
            else v
            for k, v in base.state_dict().items()
        }
        model = BertForSequenceClassification(config)
        model.load_state_dict(state)
        model.save_pretrained(root / f"ft-{index}")
        runs.append(root / f"ft-{index}")
    return root / "base", runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "hf-soup-mergekit")
    args = parser.parse_args()
    script = mergekit(args.venv)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        base, runs = build_family(root, args.candidates)
        hf_soup = [
            sys.executable,
            "-m",
            "hf_soup",
            "--base",
            str(base),
            "--candidates",
            *map(str, runs),
            "--recipe",
            "stock",
            "--output",
            str(root / "hf-soup"),
            "--quiet",
        ]
        subprocess.run(hf_soup, check=True, capture_output=True)
        models = "\n".join(f"  - model: {r}" for r in runs)
        (root / "stock.yml").write_text(
            f"merge_method: model_stock\nbase_model: {base}\nmodels:\n{models}\ndtype: float32\n"
        )
        subprocess.run(
            [str(script), str(root / "stock.yml"), str(root / "mergekit")], check=True, capture_output=True
        )
        ours = load_file(str(root / "hf-soup" / "model.safetensors"))
        theirs = load_file(str(root / "mergekit" / "model.safetensors"))
        report(ours, theirs)


def report(ours: dict, theirs: dict) -> None:
    common = sorted(set(ours) & set(theirs))
    print(f"{len(common)} tensors in both ({len(set(ours) ^ set(theirs))} in only one)")
    worst = {}
    for name in common:
        if not ours[name].is_floating_point():
            continue
        kind = "head" if name.startswith("classifier") else "body"
        scale = float(theirs[name].abs().max()) or 1.0
        diff = float((ours[name].double() - theirs[name].double()).abs().max())
        worst[kind] = max(worst.get(kind, (0.0, 0.0, "")), (diff, diff / scale, name))
    for kind, (diff, relative, name) in sorted(worst.items()):
        print(
            f"{kind}: max |hf-soup − mergekit| = {diff:.3g} ({relative:.3g} of the tensor's max), at {name}"
        )


if __name__ == "__main__":
    main()
