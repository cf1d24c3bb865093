"""The paper's image setting at small scale: soups of fine-tuned image classifiers on real Fashion-MNIST.

No pretrained image weights are reachable here, so the shared start is made first: a small ResNet (with BatchNorm)
pretrained briefly on training images 30000-59999. Variants are then fine-tuned from it with different learning
rates, seeds, epochs, augmentation, label smoothing and weight decay on the pool (training images 0..N), minus
hf-soup's selection carve-out. The report split is the 10000-image Fashion-MNIST test set.

    apt-get install -y dataset-fashion-mnist
    python scripts/reproduce_fashion_mnist.py          # resumable: trained variants are skipped

Prints best individual, uniform, greedy and pruned soups on the selection and report splits (and the same with
--recalibrate-bn), and writes `results/fashion_mnist.md` and `results/fashion_mnist.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RECIPES = [
    ("uniform soup", {"recipe": "uniform"}),
    ("greedy soup (paper: by accuracy)", {"recipe": "greedy", "selection_metric": "accuracy"}),
    ("greedy soup, by loss", {"recipe": "greedy", "selection_metric": "loss"}),
    ("pruned soup, by accuracy", {"recipe": "pruned", "passes": 2, "selection_metric": "accuracy"}),
]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workdir", default=str(ROOT / "results" / "fashion_mnist"), help="data, base and runs"
    )
    parser.add_argument("--results", default=str(ROOT / "results"), help="where the table goes")
    parser.add_argument("--pool-rows", type=int, default=20000, help="fine-tuning pool (train images 0..N)")
    parser.add_argument("--pretrain-rows", type=int, default=20000, help="pretraining images (from 30000)")
    parser.add_argument("--pretrain-epochs", type=int, default=2)
    parser.add_argument("--test-rows", type=int, default=10000)
    parser.add_argument("--variants", type=int, default=8)
    parser.add_argument("--recalibrate-bn", type=int, default=20, help="batches, for the recalibrated rows")
    args = parser.parse_args()

    import datasets

    from hf_soup import SoupConfig, cook
    from hf_soup import fashion_mnist as fm

    workdir, results = Path(args.workdir), Path(args.results)
    started = time.perf_counter()
    data = workdir / "data"
    if not (data / "test.parquet").is_file():
        fm.write_dataset(data, args.pool_rows, args.test_rows)
    pool = datasets.load_dataset(str(data), split="train")
    print("pretraining the shared start", file=sys.stderr, flush=True)
    base = fm.pretrain(workdir / "base", args.pretrain_rows, epochs=args.pretrain_epochs)
    variants = fm.SWEEP[: args.variants]
    for index, variant in enumerate(variants, 1):
        print(f"[{index}/{len(variants)}] {variant}", file=sys.stderr, flush=True)
        fm.fine_tune(base, workdir / "runs" / variant.name, variant, pool)
    trained = time.perf_counter() - started

    common = dict(base=str(base), candidates=[str(workdir / "runs" / v.name) for v in variants],
                  task="image-classification", dataset=str(data), batch_size=250)  # fmt: skip
    reports = {}
    for label, options in RECIPES:
        reports[label] = cook(SoupConfig(**common, **options), quiet=True).report
    if args.recalibrate_bn:
        for label, options in RECIPES[:2]:
            config = SoupConfig(**common, **options, recalibrate_bn=args.recalibrate_bn)
            reports[f"{label} + BN recalibrated ({args.recalibrate_bn} batches)"] = cook(
                config, quiet=True
            ).report
    rows = table_rows(reports)
    write_results(results, rows, reports, args, trained)
    return 0


def table_rows(reports: dict) -> list[dict]:
    first = next(iter(reports.values()))
    split = next(iter(first["soup"]["report"]))

    def row(name, entry, comparison=None):
        return {"name": name, "ingredients": len(entry["ingredients"]),
                "selection_accuracy": entry["selection"]["accuracy"], "selection_loss": entry["selection_loss"],
                "report_accuracy": entry["report"][split]["accuracy"],
                "report_top5": entry["report"][split].get("top5_accuracy"),
                "ece": (entry.get("ece") or {}).get(split), "vs_best": comparison}  # fmt: skip

    best = first[
        "best_individual"
    ]  # the paper's: the best selection accuracy (ties: selection loss, then id)
    rows = [row(f"best individual: best selection accuracy ({Path(best['id']).name})", best)]
    oracle = first["oracle"]
    rows.append(row(f"oracle: best on report ({Path(oracle['id']).name}; not a claim)", oracle))
    for label, report in reports.items():
        rows.append(row(label, report["soup"], report["comparisons"][split]["soup"]["accuracy"]))
    ensemble = first["ensembles"][0]
    rows.append(
        row(ensemble["name"] + " (logits)", ensemble, first["comparisons"][split]["ensemble"]["accuracy"])
    )
    for candidate in first["candidates"]:
        rows.append(row(f"  candidate {Path(candidate['id']).name}", candidate))
    return rows


def write_results(results: Path, rows: list[dict], reports: dict, args, trained: float) -> None:
    from hf_soup.report import format_delta

    first = next(iter(reports.values()))
    split = next(iter(first["soup"]["report"]))
    header = ("| model | n | selection acc | selection loss | test acc | test top-5 | test ECE | Δ acc vs best [95% CI] |\n"
              "|---|---|---|---|---|---|---|---|")  # fmt: skip
    lines = [header]
    for r in rows:
        delta = format_delta(r["vs_best"]) if r["vs_best"] else ""
        ece = f"{r['ece']:.3f}" if r["ece"] is not None else ""
        lines.append(f"| {r['name']} | {r['ingredients']} | {r['selection_accuracy']:.4f} | {r['selection_loss']:.4f} "
                     f"| {r['report_accuracy']:.4f} | {r['report_top5']:.4f} | {ece} | {delta} |")  # fmt: skip
    sizes = first["splits"]
    text = (
        "# Fashion-MNIST soups\n\n"
        f"Selection: {sizes['selection']['name']} ({sizes['selection']['size']} images); report: {split} "
        f"({sizes['report'][split]['size']} images). {args.variants} variants fine-tuned from one ResNet pretrained on "
        f"{args.pretrain_rows} other training images ({args.pretrain_epochs} epochs); pool of {args.pool_rows}. "
        f"Training took {trained:.0f} s (0 when resumed).\n\n" + "\n".join(lines) + "\n\n"
        "Command: `python scripts/reproduce_fashion_mnist.py`\n"
    )
    results.mkdir(parents=True, exist_ok=True)
    (results / "fashion_mnist.md").write_text(text)
    (results / "fashion_mnist.json").write_text(
        json.dumps({"rows": rows, "args": vars(args)}, indent=2, default=str)
    )
    print(text)


if __name__ == "__main__":
    sys.exit(main())
