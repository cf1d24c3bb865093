"""Benchmark: a greedy soup end to end, hf-soup against the plain-transformers loop a user writes by hand.

On N fine-tuned MiniLM candidates (`--runs`, e.g. `results/runs` from `scripts/reproduce_fine_foods.py`; without
them, the script fine-tunes its own with `hf_soup.training.sweep` on the fine-food reviews: ../shared if present, else the
bundled 1000), the same selection split (the sweep's held-out carve-out, written to one CSV file) and the same
selection metric (loss: continuous, so no float-level ties decide the order), measured in the same run:
- the hand-written greedy soup (as in the paper's code): per trial, load the ingredients' state dicts and average
  them, `from_pretrained` plus `load_state_dict`, `Trainer.evaluate` on the selection split;
- hf-soup's `cook(recipe="greedy")`, end to end (checks, scoring, recipe, the table's extra rows, no output);
- both must choose the same soup (asserted);
- hf-soup's model evaluations (target: at most 2N − 1), exact early rejection (examples forwarded with and without
  it) and a rerun with a warm score cache.

    python scripts/bench_greedy.py [--runs results/runs] [--variants 8] [--train-rows 256]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "fine_food_reviews"
BUNDLED = ROOT / "hf_soup" / "data" / "fine_foods"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--runs", default=None, help="a folder of candidates v*/ and their start/ (default: train)"
    )
    parser.add_argument("--data", default=str(SHARED if SHARED.exists() else BUNDLED))
    parser.add_argument(
        "--variants", type=int, default=8, help="candidates to fine-tune when --runs is not given"
    )
    parser.add_argument("--train-rows", type=int, default=256, help="rows each fine-tune sees")
    parser.add_argument("--selection-fraction", type=float, default=0.1)
    parser.add_argument("--scratch", default=None)
    args = parser.parse_args()

    from hf_soup import SoupConfig, carve_selection, cook
    from hf_soup.evaluation.data import load_data

    scratch = Path(tempfile.mkdtemp(prefix="hf-soup-bench-greedy-", dir=args.scratch))
    train = str(Path(args.data) / "train.csv")
    start, candidates = candidates_of(args, train, scratch)
    selection = scratch / "selection.csv"  # the carve-out no candidate was trained on
    carve_selection(load_data(train, split="train"), args.selection_fraction)[1].to_csv(
        selection, index=False
    )
    n = len(candidates)

    def run(cache: str, early: bool) -> tuple[dict, float]:
        config = SoupConfig(
            base=start,
            candidates=candidates,
            dataset=train,
            selection_split=str(selection),
            report_split=str(selection),
            text_column="review",
            label_column="score",
            recipe="greedy",
            selection_metric="loss",
            no_early_rejection=not early,
            cache_dir=cache,
        )
        started = time.perf_counter()
        report = cook(config, quiet=True).report
        return report, time.perf_counter() - started

    by_hand_soup, by_hand_seconds, by_hand_evaluations = hand_written_greedy(candidates, selection, scratch)
    full, _ = run(f"{scratch}/cache-full", early=False)
    early, early_seconds = run(f"{scratch}/cache-early", early=True)
    warm, warm_seconds = run(f"{scratch}/cache-early", early=True)
    ours_soup = sorted(i["id"] for i in early["mixture"]["ingredients"] if i["weight"])
    assert ours_soup == sorted(by_hand_soup), f"different soups: hf-soup {ours_soup}, by hand {by_hand_soup}"
    assert early["mixture"] == full["mixture"], "early rejection changed the soup"

    def selection_passes(report):
        return [p for p in report["cache"]["forward_passes"] if p["split"] == "selection"][: 2 * n - 1]

    forwarded_full = sum(p["examples"] for p in selection_passes(full))
    forwarded_early = sum(p["examples"] for p in selection_passes(early))
    print(
        f"{n} candidates; selection split {full['splits']['selection']['size']} examples; selection metric loss; "
        f"the soup keeps {len(ours_soup)} (the same soup by hand and with hf-soup)"
    )
    print(
        f"by hand (state dicts, from_pretrained, Trainer.evaluate): {by_hand_seconds:6.1f}s, "
        f"{by_hand_evaluations} evaluations"
    )
    print(
        f"hf-soup cook(recipe='greedy'), end to end:               {early_seconds:6.1f}s, "
        f"{len(selection_passes(early))} selection passes for greedy (target <= 2N-1 = {2 * n - 1}), "
        f"{early['cache']['early_stops']} of them stopped early"
    )
    print(
        f"early rejection: {forwarded_early} examples forwarded vs {forwarded_full} without "
        f"({forwarded_early / forwarded_full:.2f}x; same soup)"
    )
    print(
        f"warm-cache rerun: {warm_seconds:.1f}s ({warm_seconds / early_seconds:.1%} of the first run); "
        f"evaluations on rerun: {warm['cache']['evaluations']}"
    )
    print(
        f"SUMMARY: hf-soup's greedy soup is {by_hand_seconds / early_seconds:.2f}x faster than the hand-written "
        f"loop end to end (target 3x); same soup"
    )
    return 0


def candidates_of(args, train: str, scratch: Path) -> tuple[str, list[str]]:
    """`(start, candidates)`: `--runs`, or a fresh sweep of `--variants` fine-tunes of the pretrained MiniLM."""
    if args.runs:
        runs = Path(args.runs)
        candidates = sorted(str(p) for p in runs.glob("v*") if (p / "model.safetensors").exists())
        if len(candidates) < 2:
            raise SystemExit(f"{runs} holds fewer than 2 candidates (v*/model.safetensors).")
        return str(runs / "start"), candidates
    from hf_soup.demo import pretrained_path
    from hf_soup.training.sweep import SweepGrid, sweep

    workdir = scratch / "sweep"
    grid = SweepGrid(epochs=(1,))  # a short budget: this benchmark times souping, not training
    sweep(
        pretrained_path(),
        train,
        text_column="review",
        label_column="score",
        output=workdir,
        variants=args.variants,
        grid=grid,
        selection_fraction=args.selection_fraction,
        max_length=64,
        train_rows=args.train_rows,
        quiet=True,
    )
    return str(workdir / "start"), sorted(str(p) for p in (workdir / "runs").iterdir())


def hand_written_greedy(
    candidates: list[str], selection: Path, scratch: Path
) -> tuple[list[str], float, int]:
    """The greedy soup as users write it with plain transformers (after the paper's code): `(soup, seconds,
    evaluations)`. Ranked by selection loss, each candidate is kept if the soup's loss does not rise."""
    import datasets
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

    datasets.disable_progress_bars()
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(candidates[0])
    label2id = AutoModelForSequenceClassification.from_pretrained(candidates[0]).config.label2id
    encoded = datasets.load_dataset("csv", data_files=str(selection), split="train").map(
        lambda b: {
            **tokenizer(b["review"], truncation=True, max_length=128),
            "labels": [label2id[s] for s in b["score"]],
        },
        batched=True,
        remove_columns=["review", "score"],
    )
    evaluations = 0

    def loss_of(state_dicts: list[dict]) -> float:
        nonlocal evaluations
        evaluations += 1
        average = {
            k: sum(sd[k] for sd in state_dicts) / len(state_dicts)
            if state_dicts[0][k].is_floating_point()
            else state_dicts[0][k]
            for k in state_dicts[0]
        }
        model = AutoModelForSequenceClassification.from_pretrained(candidates[0])
        model.load_state_dict(average)
        args = TrainingArguments(output_dir=str(scratch / "trainer"), report_to="none", disable_tqdm=True)
        return Trainer(model=model, args=args, processing_class=tokenizer).evaluate(encoded)["eval_loss"]

    def state_dict(path: str) -> dict[str, torch.Tensor]:
        return load_file(str(Path(path) / "model.safetensors"))

    individual = {c: loss_of([state_dict(c)]) for c in candidates}
    ranked = sorted(candidates, key=lambda c: individual[c])
    soup, best = [ranked[0]], individual[ranked[0]]
    for candidate in ranked[1:]:
        loss = loss_of([state_dict(c) for c in [*soup, candidate]])
        if loss <= best:
            soup, best = [*soup, candidate], loss
    return soup, time.perf_counter() - started, evaluations


if __name__ == "__main__":
    sys.exit(main())
