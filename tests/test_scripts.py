"""Every script under `scripts/` runs with its defaults from a plain clone (no `../shared` beside it), at a small
size (`scripts/smoke_scripts.py`). The scripts check their own results (same accuracy, same soup, same tensors as
their baselines) and exit non-zero when those differ."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from smoke_scripts import SMALL, plain_clone, run, scripts


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    clone = plain_clone(tmp_path_factory.mktemp("plain"))
    assert not (clone.parent / "shared").exists()
    return clone


def test_every_script_has_a_smoke_size():
    assert sorted(SMALL) == scripts()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL))
def test_script_runs_from_a_plain_clone(name, clone, tmp_path):
    result = run(clone, name, tmp_path)
    assert result.returncode == 0, f"{name} failed:\n{result.stderr[-3000:]}"
    assert result.stdout.strip(), f"{name} printed nothing"
