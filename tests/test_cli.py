"""The CLI through its real entry point, and every bad input of the core issue."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import copy_model, installed_script
from safetensors.torch import load_file
from test_compat import permute_labels, rewrite, to_pickle

from hf_soup.cli import main

HF_SOUP = installed_script("hf-soup")


def data_args(reviews):
    return [
        "--dataset",
        str(reviews["train"]),
        "--report-split",
        str(reviews["test"]),
        "--text-column",
        "review",
        "--label-column",
        "score",
        "--max-length",
        "64",
        "--selection-fraction",
        "0.25",
    ]


@pytest.mark.slow
def test_entry_point_cook_json_and_check(zoo, reviews, tmp_path):
    assert HF_SOUP, "the hf-soup console script is not installed"
    out = tmp_path / "soup"
    run = subprocess.run(
        [
            HF_SOUP,
            "--base",
            str(zoo["base"]),
            "--candidates",
            str(zoo["root"] / "runs" / "*"),
            *data_args(reviews),
            "--recipe",
            "greedy",
            "--output",
            str(out),
            "--format",
            "json",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert {"candidates", "best_individual", "uniform", "soup", "mixture", "output"} <= set(report)
    assert report["output"] == str(out) and (out / "soup.json").is_file()
    assert "Scoring" not in run.stderr and "Materializing" not in run.stderr  # --quiet silences progress bars

    human = subprocess.run(
        [HF_SOUP, "check", "--base", str(zoo["base"]), "--candidates", str(zoo["a"]), str(zoo["b"])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert human.returncode == 0 and "accepted" in human.stdout


def test_entry_point_error_is_one_line(zoo, tmp_path):
    run = subprocess.run(
        [
            HF_SOUP,
            "--base",
            str(zoo["base"]),
            "--candidates",
            str(tmp_path / "none-*"),
            "--recipe",
            "uniform",
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert (
        lines[-1].startswith("hf-soup: error: No candidate folder matches") and "Traceback" not in run.stderr
    )
    assert not (tmp_path / "out").exists()


def test_evaluate_verb(zoo, reviews, tmp_path, capsys):
    model = copy_model(zoo["a"], tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a folder as `save_pretrained` users have it
        shutil.copy(zoo["base"] / name, model / name)
    code = main(["evaluate", str(model), *data_args(reviews), "--format", "json", "--quiet"])
    assert code == 0
    scores = json.loads(capsys.readouterr().out)
    assert 0 <= scores["test.csv"]["metrics"]["accuracy"] <= 1 and scores["test.csv"]["n"] == 200


def nan_weights(folder):
    return rewrite(
        folder,
        change_state=lambda s: s["bert.encoder.layer.0.output.dense.weight"].__setitem__(
            (0, 0), float("nan")
        ),
    )


BAD_INPUTS = {
    "no candidate matches": (lambda z, t: [str(t / "missing-*")], "No candidate folder matches"),
    "folder without config": (
        lambda z, t: [str(z["a"]), str(rewrite_unlink(copy_model(z["b"], t / "noconfig"), "config.json"))],
        "no config.json",
    ),
    "folder without weights": (
        lambda z, t: [
            str(z["a"]),
            str(rewrite_unlink(copy_model(z["b"], t / "noweights"), "model.safetensors")),
        ],
        "no model weights",
    ),
    "architectures differ": (
        lambda z, t: [
            str(z["a"]),
            str(
                rewrite(
                    copy_model(z["b"], t / "arch"),
                    change_config=lambda c: c.update(architectures=["BertForMaskedLM"]),
                )
            ),
        ],
        "architecture",
    ),
    "tensor shape differs": (
        lambda z, t: [
            str(z["a"]),
            str(
                rewrite(
                    copy_model(z["b"], t / "shape"),
                    change_state=lambda s: s.update({"bert.pooler.dense.bias": torch.zeros(5)}),
                )
            ),
        ],
        "shape",
    ),
    "label sets differ": (
        lambda z, t: [
            str(z["a"]),
            str(
                rewrite(
                    copy_model(z["b"], t / "labels"),
                    change_config=lambda c: c.update(
                        id2label={"0": "neg", "1": "pos"}, label2id={"neg": 0, "pos": 1}
                    ),
                )
            ),
        ],
        "label set",
    ),
    "only .bin weights": (
        lambda z, t: [str(z["a"]), str(to_pickle(copy_model(z["b"], t / "pickle")))],
        "--allow-pickle",
    ),
    "NaN in a candidate": (
        lambda z, t: [str(z["a"]), str(nan_weights(copy_model(z["b"], t / "nan")))],
        "NaN or Inf",
    ),
    "fewer than 2 candidates": (lambda z, t: [str(z["a"])], "at least 2"),
}


def rewrite_unlink(folder, name):
    (folder / name).unlink()
    return folder


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_cleanly(case, zoo, reviews, tmp_path, capsys):
    make_candidates, message = BAD_INPUTS[case]
    out = tmp_path / "soup"
    code = main(
        [
            "--base",
            str(zoo["base"]),
            "--candidates",
            *make_candidates(zoo, tmp_path),
            *data_args(reviews),
            "--output",
            str(out),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("hf-soup: error:") == 1
    assert not out.exists() and not list(tmp_path.glob(".soup.*"))


def test_missing_dataset_column(zoo, reviews, tmp_path, capsys):
    args = data_args(reviews)
    args[args.index("review")] = "text"
    code = main(
        [
            "--base",
            str(zoo["base"]),
            "--candidates",
            str(zoo["a"]),
            str(zoo["b"]),
            *args,
            "--output",
            str(tmp_path / "soup"),
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "no column 'text'" in err and "--text-column" in err
    assert not (tmp_path / "soup").exists()


def test_existing_output_needs_overwrite(zoo, tmp_path, capsys):
    out = tmp_path / "soup"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = [
        "--base",
        str(zoo["base"]),
        "--candidates",
        str(zoo["a"]),
        str(zoo["b"]),
        "--recipe",
        "uniform",
        "--output",
        str(out),
        "--quiet",
    ]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert main([*args, "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_allow_pickle_loads_bin_candidates(zoo, tmp_path, capsys):
    pickled = to_pickle(copy_model(zoo["b"], tmp_path / "pickle"))
    out = tmp_path / "soup"
    assert (
        main(
            [
                "--base",
                str(zoo["base"]),
                "--candidates",
                str(zoo["a"]),
                str(pickled),
                "--recipe",
                "uniform",
                "--allow-pickle",
                "--output",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    written = load_file(str(out / "model.safetensors"))
    a, b = load_file(str(zoo["a"] / "model.safetensors")), load_file(str(zoo["b"] / "model.safetensors"))
    torch.testing.assert_close(
        written["classifier.weight"], (a["classifier.weight"] + b["classifier.weight"]) / 2
    )


def test_strict_makes_rejections_fatal(zoo, tmp_path, capsys):
    permuted = permute_labels(copy_model(zoo["c"], tmp_path / "permuted"))
    bad = rewrite(
        copy_model(zoo["b"], tmp_path / "arch"), change_config=lambda c: c.update(architectures=["X"])
    )
    base_args = [
        "--base",
        str(zoo["base"]),
        "--candidates",
        str(zoo["a"]),
        str(permuted),
        str(bad),
        "--recipe",
        "uniform",
    ]
    assert main([*base_args, "--output", str(tmp_path / "lenient"), "--quiet"]) == 0
    assert main([*base_args, "--strict", "--output", str(tmp_path / "strict"), "--quiet"]) == 2
    assert "--strict" in capsys.readouterr().err and not (tmp_path / "strict").exists()


# Prints THP_MEM_ALLOC_ENABLE as it is when torch is first imported (torch reads it once, at its first allocation).
_AT_TORCH_IMPORT = """
import os, sys
class Watch:  # asked first for every import; finds nothing itself (removing it mid-lookup would skip a finder)
    seen = False
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not self.seen:
            self.seen = True
            print("at torch import:", os.environ.get("THP_MEM_ALLOC_ENABLE"), flush=True)
        return None
sys.meta_path.insert(0, Watch())
import hf_soup.cli
"""


@pytest.mark.parametrize(("given", "seen"), [(None, "1"), ("0", "0")])
def test_the_cli_turns_on_huge_pages_before_torch_loads_unless_told_not_to(given, seen):
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if given is not None:
        env["THP_MEM_ALLOC_ENABLE"] = given
    run = subprocess.run([sys.executable, "-c", _AT_TORCH_IMPORT], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [f"at torch import: {seen}"]
