"""`hf-soup demo --quick` on the real pretrained MiniLM and the bundled reviews, through the entry point."""

from __future__ import annotations

import json
import os
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
    out = tmp_path / "soup-demo"
    run = subprocess.run(
        [
            installed_script("hf-soup"),
            "demo",
            "--quick",
            "--output",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
            "--format",
            "json",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)  # stdout holds only the JSON report (Trainer logs go to stderr)
    assert len(report["candidates"]) == 3
    assert report["task"]["selection_metric"] == "loss"  # the default
    # The best individual is the paper's: the best selection accuracy, ties by selection loss, then by id.
    rows = report["candidates"]
    best = min(rows, key=lambda r: (-r["selection"]["accuracy"], r["selection_loss"], r["id"]))
    assert report["best_individual"]["id"] == best["id"]
    # The written weights are the mixture's weighted average of the run folders the sweep kept.
    written = load_file(str(out / "model.safetensors"))
    weights = {i["id"]: i["weight"] for i in report["mixture"]["ingredients"]}
    states = {cid: load_file(str(Path(cid) / "model.safetensors")) for cid in weights}
    for name, tensor in written.items():
        if tensor.is_floating_point():
            expected = sum(w * states[cid][name].double() for cid, w in weights.items())
            torch.testing.assert_close(tensor.double(), expected, atol=1e-6, rtol=0)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "great", 1: "other"}
    written = json.loads((out / "soup.json").read_text())["mixture"]
    assert [i["weight"] for i in written["ingredients"]] == [
        i["weight"] for i in report["mixture"]["ingredients"]
    ]
    assert [os.path.normpath(out.absolute() / i["id"]) for i in written["ingredients"]] == [
        i["id"] for i in report["mixture"]["ingredients"]
    ]  # named relative to the soup folder: no absolute path of this machine in what is pushed


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
