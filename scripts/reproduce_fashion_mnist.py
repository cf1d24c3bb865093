"""The paper's image setting at small scale: soups of fine-tuned image classifiers on real Fashion-MNIST.

No pretrained image weights are reachable here, so the shared start is made first: a small ResNet (with BatchNorm)
pretrained briefly on training images 30000-59999. Then `hf_soup.training.sweep` fine-tunes a seeded random-search sweep
of it (the grid is `SweepGrid.for_images()`'s, stated in the README: learning rate log-uniform in [1e-3, 5e-3],
weight decay {0, 0.05}, 1 or 2 epochs, label smoothing {0, 0.1}, augmentation (flips and 2-pixel shifts) on or
off, a data-order seed per variant) on the pool (training images 0..N) minus hf-soup's selection carve-out, from
one shared head: a linear probe on the pretrained features (`--head probe`) or a seeded random head (`--head
random`). Each sweep is souped with every recipe; the report split is the 10000-image test set, never used to
choose anything.

    apt-get install -y dataset-fashion-mnist
    python scripts/reproduce_fashion_mnist.py --head probe     # resumable: trained variants are skipped
    python scripts/reproduce_fashion_mnist.py --head random

Writes `results/fashion_mnist_<head>.md` and `.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from reproduce_fine_foods import recipes  # this folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]

# Every recipe, as in the fine-food reproduction, plus the uniform soup as a recipe of its own (with and without
# recalibrated BatchNorm statistics).
RECIPES = [("uniform soup", {"recipe": "uniform"}), *recipes()]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workdir", default=str(ROOT / "results" / "fashion_mnist"), help="data, base and sweeps"
    )
    parser.add_argument("--results", default=str(ROOT / "results"), help="where the table goes")
    parser.add_argument("--head", choices=("probe", "random"), default="probe", help="the shared head")
    parser.add_argument("--pool-rows", type=int, default=20000, help="fine-tuning pool (train images 0..N)")
    parser.add_argument("--pretrain-rows", type=int, default=20000, help="pretraining images (from 30000)")
    parser.add_argument("--pretrain-epochs", type=int, default=2)
    parser.add_argument("--test-rows", type=int, default=10000)
    parser.add_argument("--variants", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recalibrate-bn", type=int, default=20, help="batches, for the recalibrated rows")
    args = parser.parse_args()

    import datasets
    import fashion_mnist as fm  # scripts/fashion_mnist.py, beside this script

    from hf_soup import SoupConfig, cook
    from hf_soup.training.sweep import SweepGrid, sample_variants, sweep

    workdir, results = Path(args.workdir), Path(args.results)
    started = time.perf_counter()
    data = workdir / "data"
    if not (data / "test.parquet").is_file():
        fm.write_dataset(data, args.pool_rows, args.test_rows)
    datasets.disable_progress_bars()
    print("pretraining the shared start", file=sys.stderr, flush=True)
    base = fm.pretrain(workdir / "base", args.pretrain_rows, epochs=args.pretrain_epochs)
    variants = sample_variants(args.variants, SweepGrid.for_images(), seed=args.seed)
    pot = workdir / args.head
    sweep(
        base,
        str(data),
        task="image-classification",
        output=pot,
        variants=variants,
        head=args.head,
        seed=args.seed,
    )
    trained = time.perf_counter() - started

    common = dict(
        base=str(pot / "start"),
        candidates=[str(pot / "runs" / v.name) for v in variants],
        task="image-classification",
        dataset=str(data),
        seed=args.seed,
        batch_size=250,
    )
    reports = {}
    for label, options in RECIPES:
        print(f"cooking: {label}", file=sys.stderr, flush=True)
        reports[label] = cook(quiet=True, **common, **options).report
    if args.recalibrate_bn:
        for label, options in RECIPES[:3]:
            config = SoupConfig.from_options(**common, **options, recalibrate_bn=args.recalibrate_bn)
            reports[f"{label} + BN recalibrated ({args.recalibrate_bn} batches)"] = cook(
                config, quiet=True
            ).report
    rows = table_rows(reports)
    write_results(results, rows, reports, args, trained, variants)
    return 0


def table_rows(reports: dict) -> list[dict]:
    first = next(iter(reports.values()))
    split = next(iter(first["soup"]["report"]))

    def row(name, entry, comparison=None):
        return {
            "name": name,
            "ingredients": len(entry["ingredients"]),
            "selection_accuracy": entry["selection"]["accuracy"],
            "selection_loss": entry["selection_loss"],
            "report_accuracy": entry["report"][split]["accuracy"],
            "report_top5": entry["report"][split].get("top5_accuracy"),
            "ece": (entry.get("ece") or {}).get(split),
            "vs_best": comparison,
        }

    best = first[
        "best_individual"
    ]  # the paper's: the best selection accuracy (ties: selection loss, then id)
    rows = [row(f"best individual: best selection accuracy ({Path(best['id']).name})", best)]
    oracle = first["oracle"]
    rows.append(row(f"oracle: best on report ({Path(oracle['id']).name}; not a claim)", oracle))
    for label, report in reports.items():
        chosen = f" → {report['auto']['chosen']}" if report.get("auto") else ""  # what auto chose
        rows.append(row(label + chosen, report["soup"], report["comparisons"][split]["soup"]["accuracy"]))
    ensemble = first["ensembles"][0]
    rows.append(
        row(ensemble["name"] + " (logits)", ensemble, first["comparisons"][split]["ensemble"]["accuracy"])
    )
    for candidate in first["candidates"]:
        rows.append(row(f"  candidate {Path(candidate['id']).name}", candidate))
    return rows


def write_results(results: Path, rows: list[dict], reports: dict, args, trained: float, variants) -> None:
    from hf_soup.reporting.tables import format_delta

    first = next(iter(reports.values()))
    split = next(iter(first["soup"]["report"]))
    header = (
        "| model | n | selection acc | selection loss | test acc | test top-5 | test ECE | Δ acc vs best [95% CI] |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for r in rows:
        delta = format_delta(r["vs_best"]) if r["vs_best"] else ""
        ece = f"{r['ece']:.3f}" if r["ece"] is not None else ""
        lines.append(
            f"| {r['name']} | {r['ingredients']} | {r['selection_accuracy']:.4f} | {r['selection_loss']:.4f} "
            f"| {r['report_accuracy']:.4f} | {r['report_top5']:.4f} | {ece} | {delta} |"
        )
    sizes = first["splits"]
    grid = "; ".join(
        f"{v.name}: lr {v.learning_rate:g}, {v.epochs} epoch(s), wd {v.weight_decay:g}, ls "
        f"{v.label_smoothing:g}, {'augmented' if v.augment else 'no augmentation'}"
        for v in variants
    )
    text = (
        f"# Fashion-MNIST soups, {args.head} head\n\n"
        f"Selection: {sizes['selection']['name']} ({sizes['selection']['size']} images); report: {split} "
        f"({sizes['report'][split]['size']} images). {args.variants} variants (`hf_soup.training.sweep`, "
        f"`SweepGrid.for_images()`, seed {args.seed}) fine-tuned from one ResNet pretrained on "
        f"{args.pretrain_rows} other training images ({args.pretrain_epochs} epochs), with a shared "
        f"{'linear-probe' if args.head == 'probe' else 'seeded random'} head; pool of {args.pool_rows}. "
        f"Pretraining and fine-tuning took {trained:.0f} s (0 when resumed). Variants: {grid}.\n\n"
        + "\n".join(lines)
        + "\n\n"
        f"Command: `python scripts/reproduce_fashion_mnist.py --head {args.head}`\n"
    )
    results.mkdir(parents=True, exist_ok=True)
    (results / f"fashion_mnist_{args.head}.md").write_text(text)
    (results / f"fashion_mnist_{args.head}.json").write_text(
        json.dumps({"rows": rows, "args": vars(args)}, indent=2, default=str)
    )
    print(text)


if __name__ == "__main__":
    sys.exit(main())
