"""Benchmark: hf-soup's evaluator against `transformers.Trainer.evaluate` and against the machine's matmul roofline.

Same model (the pretrained MiniLM with a classifier head, fine-tuned in `results/runs` if present, else freshly
initialised), same data (fine-food reviews: 1000 from ../shared, or all of the bundled 400), same truncation. Both
must give the same accuracy. Printed, all measured in this run:
- examples/s and achieved GFLOP/s of each, the FLOPs counted from the model's shapes and the real (unpadded) token
  counts: 2·(4H² + 2HI) per token and 4·L²·H per sequence (attention) in each layer, plus the pooler;
- the roofline: `torch.mm` at the encoder's own matmul shapes (tokens of one batch × H × H, × H × I, × I × H) and
  the same thread count, weighted by each shape's share of the FLOPs.

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
    parser.add_argument("--examples", type=int, default=None, help="default: 1000, or all the data if fewer")
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

    from hf_soup.demo import pretrained_path
    from hf_soup.evaluation.data import load_data
    from hf_soup.evaluation.tasks import task_spec
    from hf_soup.evaluation.text import encode_text_split
    from hf_soup.scoring.scorer import predict, score_logits

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
    data = load_data(args.data, split="train")
    args.examples = min(args.examples or 1000, len(data))
    data = data.select(range(args.examples))
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
        lambda batch: {
            **tokenizer(batch["review"], truncation=True, max_length=args.max_length),
            "labels": [label_ids[s] for s in batch["score"]],
        },
        batched=True,
        remove_columns=data.column_names,
    )
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=scratch, report_to="none", disable_tqdm=True),
        processing_class=tokenizer,
        compute_metrics=lambda p: {"accuracy": float(np.mean(np.argmax(p.predictions, -1) == p.label_ids))},
    )
    theirs = trainer.evaluate(encoded)
    theirs_seconds = time.perf_counter() - started
    datasets.disable_progress_bars()

    lengths = [len(f["input_ids"]) for f in split.features]
    flops = encoder_flops(model.config, lengths)
    roofline = matmul_roofline(model.config, batch_tokens=64 * float(np.mean(lengths)))
    ours_rate, theirs_rate = args.examples / ours_seconds, args.examples / theirs_seconds
    print(
        f"model: {model_dir}; {args.examples} reviews, max_length {args.max_length}, mean length "
        f"{np.mean(lengths):.0f} tokens; {torch.get_num_threads()} threads; {flops / 1e9:.1f} GFLOP of useful work"
    )
    print(
        f"hf-soup evaluator:         {ours_rate:7.1f} examples/s  {flops / ours_seconds / 1e9:6.1f} GFLOP/s  "
        f"accuracy {ours.metrics['accuracy']:.4f}"
    )
    print(
        f"Trainer.evaluate defaults: {theirs_rate:7.1f} examples/s  {flops / theirs_seconds / 1e9:6.1f} GFLOP/s  "
        f"accuracy {theirs['eval_accuracy']:.4f}"
    )
    print(f"torch.mm roofline:                          {roofline / 1e9:6.1f} GFLOP/s")
    same = abs(ours.metrics["accuracy"] - theirs["eval_accuracy"]) < 1e-9
    print(
        f"SUMMARY: hf-soup is {ours_rate / theirs_rate:.2f}x Trainer.evaluate (target 2x) and "
        f"{roofline / (flops / ours_seconds):.2f}x from the matmul roofline (target 1.25x); same accuracy: {same}"
    )
    return 0 if same else 1


def encoder_flops(config, lengths: list[int]) -> float:
    """Multiply-adds × 2 of a BERT-style encoder with a pooler, on sequences of these (unpadded) lengths."""
    hidden, inner, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    tokens = sum(lengths)
    per_layer = 2 * tokens * (4 * hidden * hidden + 2 * hidden * inner) + sum(
        4 * n * n * hidden for n in lengths
    )
    return layers * per_layer + 2 * len(lengths) * hidden * hidden


def matmul_roofline(config, batch_tokens: float, repeats: int = 20) -> float:
    """FLOP/s of `torch.mm` at the encoder's linear-layer shapes, weighted by their share of each layer's FLOPs."""
    import torch

    hidden, inner, rows = config.hidden_size, config.intermediate_size, int(batch_tokens)
    shapes = [
        (rows, hidden, hidden, 4),
        (rows, hidden, inner, 1),
        (rows, inner, hidden, 1),
    ]  # (m, k, n, count)
    total_flops = total_seconds = 0.0
    for m, k, n, count in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.mm(a, b)  # warm up
        started = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        seconds = (time.perf_counter() - started) / repeats
        total_flops += count * 2 * m * k * n
        total_seconds += count * seconds
    return total_flops / total_seconds


if __name__ == "__main__":
    sys.exit(main())
