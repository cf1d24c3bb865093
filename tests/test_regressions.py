"""Defects a review of the code found, one test each (each failed before its fix): `reproduce` from any folder,
missing local paths, a push-only run's output, dropped options and warnings, typed errors, the score cache's key."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import copy_model, run_main
from hub_server import HubServer
from test_hub import TOKEN, hub_env, run

from hf_soup import SoupConfig, cook
from hf_soup.cache import cache_key, code_fingerprint
from hf_soup.errors import ConfigError


@pytest.fixture
def project(zoo, tmp_path, monkeypatch) -> Path:
    """A user's project folder: `inputs/base`, `inputs/ft0`, `inputs/ft1`, and the shell in it."""
    root = tmp_path / "project"
    copy_model(zoo["base"], root / "inputs" / "base")
    copy_model(zoo["a"], root / "inputs" / "ft0")
    copy_model(zoo["b"], root / "inputs" / "ft1")
    monkeypatch.chdir(root)
    return root


def test_reproduce_works_from_any_folder(project, monkeypatch):
    made = run_main(
        "--base",
        "inputs/base",
        "--candidates",
        "inputs/ft0",
        "inputs/ft1",
        "--recipe",
        "uniform",
        "--output",
        "soups/uniform",
        "--quiet",
    )
    assert made.returncode == 0, made.stderr
    manifest = json.loads((project / "soups" / "uniform" / "soup.json").read_text())
    assert manifest["base"] == "../../inputs/base"  # relative to the soup folder, and plainly a path
    assert sorted(i["id"] for i in manifest["mixture"]["ingredients"]) == [
        "../../inputs/ft0",
        "../../inputs/ft1",
    ]
    for cwd, target in (
        (project, "soups/uniform"),
        (project / "soups", "uniform"),
        (project / "soups" / "uniform", "."),
    ):
        monkeypatch.chdir(cwd)
        again = run_main("reproduce", target, "--quiet")
        assert again.returncode == 0, (cwd, again.stderr)
        assert "Reproduced bit-exactly" in again.stdout


def test_reproduce_names_a_moved_local_ingredient_without_asking_the_hub(project, monkeypatch):
    assert (
        run_main(
            "--base",
            "inputs/base",
            "--candidates",
            "inputs/ft0",
            "inputs/ft1",
            "--recipe",
            "uniform",
            "--output",
            "soups/uniform",
            "--quiet",
        ).returncode
        == 0
    )
    shutil.move(project / "inputs" / "ft1", project / "elsewhere")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: a Hub lookup would fail slowly
    started = time.perf_counter()
    result = run_main("reproduce", "soups/uniform")
    assert result.returncode != 0
    assert "../../inputs/ft1 is not where soup.json says" in result.stderr
    assert str(project / "inputs" / "ft1") in result.stderr and "Traceback" not in result.stderr
    assert time.perf_counter() - started < 20  # no retries against a Hub


@pytest.mark.slow
def test_a_missing_local_path_says_so_and_names_the_hub_too(zoo, tmp_path, monkeypatch):
    hub = HubServer(tmp_path / "hub").start()
    try:
        env = hub_env(hub, tmp_path)
        started = time.perf_counter()
        result = run(
            [
                "--base",
                "inputs/base",
                "--candidates",
                str(zoo["a"]),
                str(zoo["b"]),
                "--recipe",
                "uniform",
                "--output",
                str(tmp_path / "out"),
            ],
            env,
        )
        elapsed = time.perf_counter() - started
    finally:
        hub.stop()
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "inputs/base: repository not found" in result.stderr
    assert f"Nor is there a folder inputs/base in {Path.cwd()}" in result.stderr
    assert not (tmp_path / "out").exists()
    # And with no Hub at all (nothing listens on port 9): one attempt, not huggingface_hub's five retries.
    started = time.perf_counter()
    unreachable = run(
        ["--base", "inputs/base", "--candidates", str(zoo["a"]), str(zoo["b"]), "--recipe", "uniform"],
        hub_env(None, tmp_path),
    )
    assert unreachable.returncode != 0
    assert "inputs/base: the Hub could not be reached" in unreachable.stderr
    assert "Nor is there a folder inputs/base" in unreachable.stderr
    # Start-up and one refused connection: huggingface_hub's retries took a minute.
    assert time.perf_counter() - started < elapsed + 15


def test_a_missing_local_candidate_names_both(zoo):
    result = run_main(
        "--base", str(zoo["base"]), "--candidates", str(zoo["a"]), "runs/ft-9", "--recipe", "uniform"
    )
    assert result.returncode != 0
    assert result.stderr.startswith("hf-soup: error: runs/ft-9: ") and "Traceback" not in result.stderr
    assert "Nor is there a folder runs/ft-9 in" in result.stderr


def test_a_push_only_run_reports_no_deleted_folder(zoo, tmp_path):
    hub = HubServer(tmp_path / "hub").start()
    try:
        hub.tokens[TOKEN] = "org"
        result = run(
            [
                "--base",
                str(zoo["base"]),
                "--candidates",
                str(zoo["a"]),
                str(zoo["b"]),
                "--recipe",
                "uniform",
                "--push-to",
                "org/soup",
                "--quiet",
            ],
            hub_env(hub, tmp_path),
        )
        assert result.returncode == 0, result.stderr
        soup = hub.store.repos["org/soup"]
        assert "soup.json" in soup.commits[soup.main].files
    finally:
        hub.stop()
    assert "Soup written to" not in result.stdout and "Pushed: " in result.stdout


def test_cook_applies_keyword_options_over_a_config(zoo, tmp_path):
    config = SoupConfig(base=str(zoo["base"]), candidates=[str(zoo["a"]), str(zoo["b"])], recipe="uniform")
    result = cook(config, output=str(tmp_path / "soup"), quiet=True)
    assert result.output == tmp_path / "soup" and (tmp_path / "soup" / "soup.json").is_file()
    with pytest.raises(ConfigError, match="Unknown option"):
        cook(config, outptu=str(tmp_path / "typo"), quiet=True)


def test_an_unknown_selection_metric_is_a_config_error(zoo, reviews, tmp_path):
    with pytest.raises(ConfigError, match="--selection-metric 'f2' is not computed"):
        cook(
            base=str(zoo["base"]),
            candidates=[str(zoo["a"]), str(zoo["b"])],
            dataset=str(reviews["train"]),
            text_column="review",
            label_column="score",
            selection_metric="f2",
            max_eval_examples=20,
            quiet=True,
        )


def test_causal_lm_documents_left_out_are_said(monkeypatch):
    from hf_soup.errors import DatasetError
    from hf_soup.evaluation.tasks import task_spec
    from hf_soup.scoring import preparation

    logged = []  # the module logger's own calls: whatever handlers or propagation earlier tests left configured
    monkeypatch.setattr(preparation.logger, "warning", lambda message, *args: logged.append(message % args))
    spec = task_spec("causal-lm", "reviews.csv", text_column="review")
    split = SimpleNamespace(name="selection", empty_inputs=3)  # what encode_document_split counts
    warnings = preparation._blank_text_warnings(spec, {"selection": split}, strict=False)
    assert warnings == [
        "The selection split has 3 document(s) of fewer than two tokens in 'review'; they predict "
        "nothing and are left out."
    ]
    assert logged == warnings
    with pytest.raises(DatasetError, match="--strict: The selection split has 3 document"):
        preparation._blank_text_warnings(spec, {"selection": split}, strict=True)


def test_the_score_cache_key_changes_with_the_code(tmp_path):
    package = Path(__file__).resolve().parents[1] / "hf_soup"
    digest = hashlib.sha256(__import__("hf_soup").__version__.encode())
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    assert code_fingerprint() == digest.hexdigest()  # every source file, by content
    assert json.loads(cache_key("score", 1))[0] == code_fingerprint()
    copy = tmp_path / "hf_soup"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__", "data"))
    scoring = copy / "scoring" / "scorer.py"
    scoring.write_text(scoring.read_text() + "\n# a change to how scores are computed\n")
    assert code_fingerprint(copy) != code_fingerprint()  # the same version, other code: other keys
