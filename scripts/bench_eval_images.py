"""Benchmark: hf-soup's image scoring against `transformers.Trainer.evaluate` and the machine's matmul roofline.

The model is the small ResNet that `scripts/reproduce_fashion_mnist.py` soups (`scripts/fashion_mnist.py`), seeded;
the data are Fashion-MNIST test images (`apt-get install dataset-fashion-mnist`), through the same image processor.
Both paths must give the same accuracy. Printed, all measured in this run:
- images/s and achieved GFLOP/s of each (hf-soup's also for one evaluation pass alone), FLOPs counted from the
  layers' real shapes (forward hooks: every convolution and linear layer, 2 × output elements × input elements per
  output);
- the roofline: `torch.mm` at each convolution's GEMM shape (images of one batch × output pixels, input channels
  × kernel area, output channels) and the same thread count, weighted by each layer's share of the FLOPs.

    python scripts/bench_eval_images.py [--examples 2000] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64, help="hf-soup's evaluation batch (its default)")
    args = parser.parse_args()

    import fashion_mnist as fm  # scripts/fashion_mnist.py, beside this script
    import torch
    from transformers import ResNetForImageClassification, Trainer, TrainingArguments, default_data_collator

    from hf_soup.evaluation.images import encode_image_split
    from hf_soup.evaluation.tasks import task_spec
    from hf_soup.scoring.scorer import predict, score_logits

    torch.manual_seed(0)
    labels = {i: name for i, name in enumerate(fm.LABELS)}
    model = ResNetForImageClassification(
        fm.model_config(num_labels=10, id2label=labels, label2id={v: k for k, v in labels.items()})
    ).eval()
    images, targets = fm.read_split("test")
    data = fm.to_dataset(images[: args.examples], targets[: args.examples])
    processor = fm.image_processor()
    spec = task_spec("image-classification", str(fm.DATA_DIR))  # the dataset only names the source here

    # hf-soup: process every image once, batches of `--batch-size`, inference_mode.
    started = time.perf_counter()
    split = encode_image_split(
        "test", data, spec, processor, model_labels=fm.LABELS, num_labels=10, quiet=True
    )
    processed = time.perf_counter()
    ours = score_logits(
        predict(model, split, default_data_collator, args.batch_size, quiet=True), split, spec
    )
    ours_seconds, pass_seconds = time.perf_counter() - started, time.perf_counter() - processed

    # transformers.Trainer.evaluate with default arguments, the processor applied on the fly (as its docs show).
    started = time.perf_counter()
    encoded = data.with_transform(
        lambda b: {
            "pixel_values": processor(b["image"], return_tensors="pt")["pixel_values"],
            "labels": b["label"],
        }
    )
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=tempfile.mkdtemp(), report_to="none", disable_tqdm=True, remove_unused_columns=False
        ),
        compute_metrics=lambda p: {"accuracy": float(np.mean(np.argmax(p.predictions, -1) == p.label_ids))},
    )
    theirs = trainer.evaluate(encoded)
    theirs_seconds = time.perf_counter() - started

    flops, gemms = layer_flops(model, split.features[0]["pixel_values"][None], args.batch_size)
    flops *= args.examples
    roofline = matmul_roofline(gemms)
    same = abs(ours.metrics["accuracy"] - theirs["eval_accuracy"]) < 1e-9
    print(
        f"ResNet ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), {args.examples} images "
        f"28x28; {torch.get_num_threads()} threads; {flops / 1e9:.1f} GFLOP"
    )
    for name, seconds, accuracy in (
        ("hf-soup scoring", ours_seconds, ours.metrics["accuracy"]),
        ("Trainer.evaluate", theirs_seconds, theirs["eval_accuracy"]),
    ):
        print(
            f"{name:<17} {args.examples / seconds:8.1f} images/s  {flops / seconds / 1e9:6.1f} GFLOP/s  "
            f"accuracy {accuracy:.4f}"
        )
    print(
        f"hf-soup, one evaluation pass alone (images are processed once per split; a soup's trials reuse "
        f"them): {args.examples / pass_seconds:.1f} images/s, {flops / pass_seconds / 1e9:.1f} GFLOP/s"
    )
    print(f"torch.mm roofline                        {roofline / 1e9:6.1f} GFLOP/s")
    print(
        f"SUMMARY: hf-soup is {theirs_seconds / ours_seconds:.2f}x Trainer.evaluate (target 2x) and "
        f"{roofline / (flops / ours_seconds):.2f}x from the matmul roofline (target 1.25x); same accuracy: {same}"
    )
    return 0 if same else 1


def layer_flops(model, one_image, batch_size: int) -> tuple[float, list[tuple[int, int, int, float]]]:
    """FLOPs of one image through every Conv2d and Linear, and each one's GEMM shape `(m, k, n, flops)` for a
    batch of `batch_size` images."""
    import torch

    gemms: list[tuple[int, int, int, float]] = []

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            m, n = output.shape[2] * output.shape[3], module.out_channels
        else:
            k, m, n = module.in_features, 1, module.out_features
        gemms.append((m * batch_size, k, n, 2.0 * m * k * n))

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
    ]
    with torch.inference_mode():
        model(pixel_values=one_image)
    for handle in handles:
        handle.remove()
    return sum(g[3] for g in gemms), gemms


def matmul_roofline(gemms: list[tuple[int, int, int, float]], repeats: int = 10) -> float:
    """FLOP/s of `torch.mm` at these GEMM shapes, weighted by each one's FLOPs."""
    import torch

    total_flops = total_seconds = 0.0
    for m, k, n, _ in gemms:
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.mm(a, b)
        started = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        total_seconds += (time.perf_counter() - started) / repeats
        total_flops += 2.0 * m * k * n
    return total_flops / total_seconds


if __name__ == "__main__":
    sys.exit(main())
