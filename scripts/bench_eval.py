"""Benchmark: hf-soup's evaluator against `transformers.Trainer.evaluate` with default arguments.

Same model (the pretrained MiniLM with a classifier head, fine-tuned in `results/runs` if present, else freshly
initialised), same data (1000 fine-food test reviews), same truncation. Both must give the same accuracy.

    python scripts/bench_eval.py [--model results/runs/v0] [--examples 1000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "fine_food_reviews" / "test.csv"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="a fine-tuned model folder (default: results/runs/v0, or a new head)"
    )
    parser.add_argument(
        "--data", default=str(DATA if DATA.exists() else ROOT / "hf_soup/data/fine_foods/test.csv")
    )
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()

    import datasets
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from hf_soup.data import load_data, task_spec
    from hf_soup.demo import pretrained_path
    from hf_soup.scoring import predict, score_logits
    from hf_soup.text import encode_text_split

    scratch = tempfile.mkdtemp()
    model_dir = Path(args.model) if args.model else ROOT / "results" / "runs" / "v0"
    if not (model_dir / "config.json").exists():  # the pretrained MiniLM under a seeded two-label head
        torch.manual_seed(0)
        start = AutoModelForSequenceClassification.from_pretrained(
            pretrained_path(),
            num_labels=2,
            id2label={0: "great", 1: "other"},
            label2id={"great": 0, "other": 1},
        )
        model_dir = Path(scratch) / "start"
        start.save_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(
        model_dir if (model_dir / "tokenizer.json").exists() else pretrained_path()
    )
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    data = load_data(args.data, split="train").select(range(args.examples))
    spec = task_spec(dataset=args.data, text_column="review", label_column="score")

    # hf-soup: tokenise once, length-sorted batches, dynamic padding, inference_mode.
    started = time.perf_counter()
    split = encode_text_split(
        "test", data, spec, tokenizer, model_labels=labels, num_labels=len(labels), max_length=args.max_length
    )
    ours = score_logits(predict(model, split, DataCollatorWithPadding(tokenizer), quiet=True), split, spec)
    ours_seconds = time.perf_counter() - started

    # transformers.Trainer.evaluate with default arguments (and the same tokenisation).
    started = time.perf_counter()
    label_ids = {name: i for i, name in enumerate(labels)}
    encoded = data.map(
        lambda batch: {**tokenizer(batch["review"], truncation=True, max_length=args.max_length),
                       "labels": [label_ids[s] for s in batch["score"]]},
        batched=True, remove_columns=data.column_names,
    )  # fmt: skip
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=scratch, report_to="none", disable_tqdm=True),
        processing_class=tokenizer,
        compute_metrics=lambda p: {"accuracy": float(np.mean(np.argmax(p.predictions, -1) == p.label_ids))},
    )
    theirs = trainer.evaluate(encoded)
    theirs_seconds = time.perf_counter() - started
    datasets.disable_progress_bars()

    ours_rate, theirs_rate = args.examples / ours_seconds, args.examples / theirs_seconds
    print(f"model: {model_dir}; {args.examples} reviews, max_length {args.max_length}")
    print(f"hf-soup evaluator:         {ours_rate:7.1f} examples/s  accuracy {ours.metrics['accuracy']:.4f}")
    print(f"Trainer.evaluate defaults: {theirs_rate:7.1f} examples/s  accuracy {theirs['eval_accuracy']:.4f}")
    same = abs(ours.metrics["accuracy"] - theirs["eval_accuracy"]) < 1e-9
    print(
        f"SUMMARY: hf-soup is {ours_rate / theirs_rate:.2f}x Trainer.evaluate (target 2x); same accuracy: {same}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
