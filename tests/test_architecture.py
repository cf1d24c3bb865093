"""The code keeps the shape #17 gave it: layered imports (checked by `lint-imports` in CI, and here), short
functions, short positional argument lists, and recipes that each live in one file plus one registry line."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_soup"
MAX_FUNCTION_LINES = 60
MAX_POSITIONAL_ARGUMENTS = 6


def _trees():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE.parent), ast.parse(path.read_text())


def long_functions(trees) -> list[str]:
    return [
        f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path, tree in trees
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


def long_calls(trees) -> list[str]:
    return [
        f"{path}:{node.lineno} ({len(node.args)} positional)"
        for path, tree in trees
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and len(node.args) > MAX_POSITIONAL_ARGUMENTS
    ]


def test_no_function_is_longer_than_60_lines():
    found = long_functions(_trees())
    assert not found, found


def test_no_call_passes_more_than_6_positional_arguments():
    found = long_calls(_trees())
    assert not found, found


def test_the_checkers_see_violations():
    """The two checks above flag code that breaks the rules, and only that (they cannot pass vacuously)."""
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    bad = [("bad.py", ast.parse(f"def long():\n{body}\n\nf(1, 2, 3, 4, 5, 6, 7)\n"))]
    good = [("good.py", ast.parse("def short():\n    return 1\n\nf(1, 2, 3, 4, 5, 6, seven=7)\n"))]
    assert long_functions(bad) == [f"bad.py:1 long ({MAX_FUNCTION_LINES + 1} lines)"]
    assert long_calls(bad) == [f"bad.py:{MAX_FUNCTION_LINES + 3} (7 positional)"]
    assert long_functions(good) == [] and long_calls(good) == []


def test_no_import_cycle_and_no_magic_base_key():
    """The sources layer names the base as the base: no `"__base__"` key anywhere in the package."""
    offenders = [str(path) for path, _ in _trees() if "__base__" in (PACKAGE.parent / path).read_text()]
    assert not offenders, offenders


def test_import_layers_hold():
    """The layer contract in pyproject.toml (`lint-imports`, as CI runs it)."""
    # `lint-imports`, through this interpreter: no PATH or venv activation needed.
    run = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    result = subprocess.run(
        [sys.executable, "-c", run, "--no-cache"],
        capture_output=True,
        text=True,
        cwd=PACKAGE.parent,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 kept, 0 broken" in result.stdout  # the layers, three forbidden imports, and no import cycles


def test_the_layer_contract_is_the_folder_map():
    """Every folder (and top-level module) of the package is a rung of the layer contract, and every rung exists:
    the contract in pyproject.toml is the map of the code, not a list that happens to pass."""
    import tomllib

    settings = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in settings["contracts"] if c["type"] == "layers")["layers"]
    named = {name.strip() for rung in layers for name in rung.split("|")}
    present = {p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    present |= {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert named == present
    assert len(layers) <= 14  # a map a reader can hold in mind


def test_a_recipe_is_one_file_and_one_registry_line(tmp_path, monkeypatch, tokenizer_dir):
    """A recipe registered in `RECIPES`, with an option of its own, works from the CLI (`--recipe`, and a flag for
    its option), `SoupConfig`, `cook`, `soup.json` and the card without touching any other module: here a toy
    "best-single" recipe, defined in this test, that keeps the candidate at rank `--pick`."""
    from dataclasses import dataclass

    from test_golden import build_fixtures

    from hf_soup import SoupConfig, cook, recipes
    from hf_soup.cli import _config_from, build_parser
    from hf_soup.errors import ConfigError
    from hf_soup.mixture import Mixture
    from hf_soup.recipes.base import RecipeResult, SoupRecipe, at_least, option, rank

    @dataclass(frozen=True)
    class BestSingleOptions:
        pick: int = option(1, "Keep the candidate at this rank (1: the best).", metavar="K")

        def __post_init__(self):
            at_least(self.pick, 1, "--pick")

    class BestSingle(SoupRecipe):
        Options = BestSingleOptions
        card_section = "### Best single\n\nPicked `{{ details.picked }}`.\n"

        def __init__(self, pick: int = 1):
            self.pick = pick

        @classmethod
        def from_config(cls, config, context):
            return cls(config.options(cls).pick)

        @classmethod
        def name(cls):
            return "best-single"

        @classmethod
        def pretty_name(cls):
            return "Best single"

        def cook(self, candidates, individual_scores, objective, revisions=None, tie_break=None):
            picked = rank(candidates, individual_scores, tie_break)[self.pick - 1]
            return RecipeResult(Mixture.uniform(self.name(), [picked], revisions), details={"picked": picked})

    monkeypatch.setitem(recipes.RECIPES, "best-single", BestSingle)
    # The CLI: --recipe takes it, and its option is a flag (in its own help group), typed from the annotation.
    parser = build_parser()
    args = parser.parse_args(
        [
            "cook",
            "--base",
            "b",
            "--candidates",
            "c",
            "--recipe",
            "best-single",
            "--pick",
            "2",
            "--dataset",
            "d.csv",
            "--text-column",
            "t",
            "--label-column",
            "l",
        ]
    )
    assert args.recipe == "best-single" and args.pick == 2
    assert "Best single options (--recipe best-single):\n  --pick K" in parser._subparsers._group_actions[
        0
    ].choices["cook"].format_help().replace("\r", "")
    assert _config_from(args).recipe_options == {"pick": 2}
    # An option of another recipe, and a bad value, are refused before any work.
    with pytest.raises(
        ConfigError, match="--pick is an option of --recipe best-single, not of --recipe uniform"
    ):
        SoupConfig.from_options(base="b", candidates=["c"], recipe="uniform", pick=2)
    with pytest.raises(ConfigError, match="--pick must be at least 1, got 0"):
        SoupConfig.from_options(
            base="b",
            candidates=["c"],
            recipe="best-single",
            pick=0,
            dataset="d.csv",
            text_column="t",
            label_column="l",
        )

    build_fixtures(tmp_path, tokenizer_dir)
    options = dict(
        base=str(tmp_path / "base"),
        candidates=[str(tmp_path / "runs" / "*")],
        dataset=str(tmp_path / "select.csv"),
        report_split=str(tmp_path / "test.csv"),
        text_column="review",
        label_column="score",
    )
    with pytest.raises(ConfigError, match="Unknown recipe 'stew'"):
        cook(recipe="stew", output=str(tmp_path / "stew"), **options)
    result = cook(recipe="best-single", pick=2, quiet=True, output=str(tmp_path / "soup"), **options)
    # The ranking by selection loss (the default --selection-metric), ties by id, computed here.
    ranked = [
        row.id
        for row in sorted(result.summary.candidates, key=lambda row: (row.scores.selection_loss, row.id))
    ]
    assert result.mixture.ids() == [ranked[1]]  # the option reached the recipe: rank 2, not the best
    manifest = json.loads((tmp_path / "soup" / "soup.json").read_text())
    picked = "../runs/" + Path(ranked[1]).name
    assert manifest["best-single"] == {"picked": picked}
    assert manifest["config"]["recipe_options"] == {"pick": 2}
    assert manifest["recipe"] == {
        "name": "best-single",
        "pretty_name": "Best single",
        "reference_url": "https://arxiv.org/abs/2203.05482",
    }
    card = (tmp_path / "soup" / "README.md").read_text()
    assert "A **best single**" in card and f"### Best single\n\nPicked `{picked}`." in card
    assert "Recipe options: `--pick 2`." in card
    assert result.summary.details["picked"] == result.mixture.ids()[0]

    # A data-free recipe runs without --dataset, with its default option (recorded), and its card section shows.
    monkeypatch.setattr(BestSingle, "needs_data", False)
    merged = cook(
        base=options["base"],
        candidates=options["candidates"],
        recipe="best-single",
        output=str(tmp_path / "merged"),
        quiet=True,
    )
    card = (tmp_path / "merged" / "README.md").read_text()
    assert merged.summary.soup is None and "### Best single\n\nPicked `../runs/" in card
    assert "Recipe options: `--pick 1`." in card


# Imported by some runs only: a plain merge needs none of them, and no run needs `evaluate` (whose package imports
# `transformers.pipelines`: about 8 s on 2 cores) or `transformers.pipelines` itself.
HEAVY = ("evaluate", "transformers.pipelines", "datasets", "scipy", "sklearn", "matplotlib")
NEVER = ("evaluate", "transformers.pipelines")


def _modules_after(args: list[str]) -> set[str]:
    """The heavy modules a `hf-soup` run with `args` imported, run in a fresh interpreter."""
    script = (
        "import sys\nfrom hf_soup.cli import main\n"
        f"code = main({args!r})\nassert code == 0, code\n"
        f"print('imported:', *(m for m in {HEAVY!r} if m in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return set(run.stdout.splitlines()[-1].split()[1:])


@pytest.mark.slow
def test_a_plain_merge_imports_no_evaluation_and_a_scored_run_no_evaluate(zoo, reviews, tmp_path):
    candidates = ["--base", str(zoo["base"]), "--candidates", str(zoo["root"] / "runs" / "*"), "--quiet"]
    plain = _modules_after([*candidates, "--recipe", "uniform", "--output", str(tmp_path / "plain")])
    assert plain == set(), f"a plain merge imported {sorted(plain)}"
    data = ["--dataset", str(reviews["train"]), "--text-column", "review", "--label-column", "score"]
    scored = _modules_after(
        [*candidates, *data, "--max-eval-examples", "40", "--output", str(tmp_path / "s")]
    )
    assert {"datasets", "matplotlib"} <= scored  # what scoring and its plots use, so the probe above is live
    assert not scored & set(NEVER), f"a scored run imported {sorted(scored & set(NEVER))}"
