"""`hf-soup demo --quick` on the real pretrained MiniLM and the bundled reviews, through the entry point."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import installed_script
from transformers import AutoModelForSequenceClassification


@pytest.mark.real_model
@pytest.mark.slow
def test_demo_quick_runs_offline(tmp_path):
    out = tmp_path / "soup-demo"
    run = subprocess.run(
        [installed_script("hf-soup"), "demo", "--quick", "--output", str(out), "--format", "json", "--quiet"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)  # stdout holds only the JSON report (Trainer logs go to stderr)
    assert len(report["candidates"]) == 3
    assert report["task"]["selection_metric"] == "loss"  # the default
    assert report["soup"]["selection_loss"] <= report["best_individual"]["selection_loss"]
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "great", 1: "other"}
    written = json.loads((out / "soup.json").read_text())["mixture"]
    assert [i["weight"] for i in written["ingredients"]] == [
        i["weight"] for i in report["mixture"]["ingredients"]
    ]
    assert [os.path.normpath(out.absolute() / i["id"]) for i in written["ingredients"]] == [
        i["id"] for i in report["mixture"]["ingredients"]
    ]  # named relative to the soup folder: no absolute path of this machine in what is pushed
