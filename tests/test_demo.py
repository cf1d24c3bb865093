"""`hf-soup demo --quick` on the real pretrained MiniLM and the bundled reviews, through the entry point."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import installed_script
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification


@pytest.mark.real_model
@pytest.mark.slow
def test_demo_quick_runs_offline(tmp_path):
    """The default console and folders, as a first-time user gets them: no --quiet, no --workdir."""
    run = subprocess.run(
        [installed_script("hf-soup"), "demo", "--quick", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "soup-demo"
    report = json.loads(run.stdout)  # stdout holds only the JSON report (progress and logs go to stderr)
    assert len(report["candidates"]) == 3
    assert report["task"]["selection_metric"] == "loss"  # the default
    # The best individual is the paper's: the best selection accuracy, ties by selection loss, then by id.
    rows = report["candidates"]
    best = min(rows, key=lambda r: (-r["selection"]["accuracy"], r["selection_loss"], r["id"]))
    assert report["best_individual"]["id"] == best["id"]
    # The written weights are the mixture's weighted average of the run folders the sweep kept.
    written = load_file(str(out / "model.safetensors"))
    weights = {i["id"]: i["weight"] for i in report["mixture"]["ingredients"]}
    states = {
        cid: load_file(str(tmp_path / cid / "model.safetensors")) for cid in weights
    }  # ids as typed: here
    for name, tensor in written.items():
        if tensor.is_floating_point():
            expected = sum(w * states[cid][name].double() for cid, w in weights.items())
            torch.testing.assert_close(tensor.double(), expected, atol=1e-6, rtol=0)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "great", 1: "other"}
    manifest = json.loads((out / "soup.json").read_text())
    assert [i["weight"] for i in manifest["mixture"]["ingredients"]] == list(weights.values())
    # Named relative to the soup folder (no absolute path of this machine in what is pushed), and still there:
    # the variants stay beside the soup, in soup-demo-runs/.
    kept = [os.path.normpath(out.absolute() / i["id"]) for i in manifest["mixture"]["ingredients"]]
    assert kept == [str(tmp_path / cid) for cid in weights] and all(
        Path(k).parent == tmp_path / "soup-demo-runs" / "quick" / "runs" for k in kept
    )
    assert all((Path(k) / "model.safetensors").is_file() for k in kept)
    _assert_quiet_console(run.stderr, [Path(c["id"]).name for c in rows])
    _assert_readable_card((out / "README.md").read_text(), [Path(k).name for k in kept])


def _assert_quiet_console(stderr: str, variants: list[str]) -> None:
    """One bar and one summary line per variant; none of Trainer's dicts, reprs or the libraries' own bars."""
    for noise in (
        "{'train_runtime'",
        "{'loss'",
        "SweepVariant(",
        "Loading weights",
        "Writing model shards",
        "Map:",
    ):
        assert noise not in stderr, noise
    summaries = re.findall(r"^INFO: (\d)/3 (\S+): learning rate \S+, \d+ epoch\(s\), [\d.]+ s", stderr, re.M)
    assert sorted(name for _, name in summaries) == sorted(variants)
    assert [index for index, _ in summaries] == ["1", "2", "3"]


def _assert_readable_card(card: str, ingredients: list[str]) -> None:
    """model-index names the bundled data by a readable name and its format, never a path or a Hub claim; the
    ingredients are their run folders' names; no path into a folder (temporary or not) appears."""
    import yaml

    metadata = yaml.safe_load(card.split("---", 2)[1])
    dataset = metadata["model-index"][0]["results"][0]["dataset"]
    assert dataset == {"name": "fine_foods", "type": "csv", "split": "test"}
    assert "base_model" not in metadata and "datasets" not in metadata  # nothing here is on the Hub
    assert "../" not in card and "/tmp" not in card
    for name in ingredients:
        assert f"| `{name}` |" in card


def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    """In the fast tier: the demo's guard runs before any model is loaded or trained."""
    from conftest import run_main

    taken = tmp_path / "mine"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me")
    result = run_main("demo", "--quick", "--output", str(taken))
    assert result.returncode == 2
    assert f"{taken} exists and is not an earlier demo soup; choose another --output." in result.stderr
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]


def test_python_dash_m_runs_the_cli():
    import sys

    from hf_soup import __version__

    run = subprocess.run(
        [sys.executable, "-m", "hf_soup", "--version"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and run.stdout.strip() == f"hf-soup {__version__}"
