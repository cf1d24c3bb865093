"""Diagnostics: distances to the base and angles between task vectors, against a direct computation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hf_soup.api import check_with_diagnostics
from hf_soup.candidates.compat import check_compatibility
from hf_soup.candidates.diagnostics import diagnose
from hf_soup.cli import main


def task_vector(folder, base) -> torch.Tensor:
    state = load_file(str(folder / "model.safetensors"))
    return torch.cat(
        [(state[f"bert.{n}"].double() - t.double()).reshape(-1) for n, t in sorted(base.items())]
    )


def test_angles_and_distances_match_a_direct_computation(zoo, scratch):
    base = load_file(str(zoo["base"] / "model.safetensors"))
    folders = [zoo[c] for c in "abcd"] + [scratch]
    _, diagnostics = check_with_diagnostics(str(zoo["base"]), [str(f) for f in folders])
    assert diagnostics.ids == [str(f) for f in folders]
    vectors = torch.stack([task_vector(f, base) for f in folders])
    base_norm = torch.cat([t.double().reshape(-1) for t in base.values()]).norm()
    distances = (vectors.norm(dim=1) / base_norm).numpy()
    np.testing.assert_allclose([diagnostics.relative_distance[str(f)] for f in folders], distances, rtol=1e-9)
    cosine = (vectors @ vectors.T) / torch.outer(vectors.norm(dim=1), vectors.norm(dim=1))
    expected = np.degrees(np.arccos(np.clip(cosine.numpy(), -1, 1)))
    np.fill_diagonal(expected, 0.0)  # arccos(1 − rounding) is a few 1e-6 degrees, not a real angle
    np.testing.assert_allclose(diagnostics.angles, expected, atol=1e-6)


def test_small_blocks_give_the_same_answer(zoo):
    _report, sources = check_compatibility(zoo["base"], [str(zoo[c]) for c in "abcd"])
    whole = diagnose(sources, quiet=True)
    blocked = diagnose(sources, block_elements=100, quiet=True)  # many row blocks per tensor
    np.testing.assert_allclose(blocked.cosine, whole.cosine, atol=1e-10)
    assert blocked.relative_distance == pytest.approx(whole.relative_distance, rel=1e-10)


def test_flags_a_model_from_another_initialisation_and_not_the_fine_tunes(zoo, scratch):
    _, genuine = check_with_diagnostics(str(zoo["base"]), [str(zoo[c]) for c in "abcd"])
    assert genuine.flagged == {}
    _, mixed = check_with_diagnostics(str(zoo["base"]), [str(zoo[c]) for c in "abcd"] + [str(scratch)])
    assert list(mixed.flagged) == [str(scratch)]
    assert "does not look fine-tuned" in mixed.flagged[str(scratch)]


def test_check_diagnostics_cli(zoo, scratch, tmp_path, capsys):
    argv = [
        "check",
        "--base",
        str(zoo["base"]),
        "--candidates",
        str(zoo["a"]),
        str(zoo["b"]),
        str(scratch),
        "--diagnostics",
        "--heatmap",
        str(tmp_path / "angles.png"),
        "--quiet",
    ]
    assert main([*argv, "--format", "json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert list(payload["diagnostics"]["flagged"]) == [str(scratch)]
    assert len(payload["diagnostics"]["angle_degrees"]) == 3
    assert (tmp_path / "angles.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([*argv, "--strict"]) == 2
    captured = capsys.readouterr()
    assert "NOT A FINE-TUNE?" in captured.out
    assert captured.err.count("error:") == 1 and "do not look fine-tuned" in captured.err


def test_cook_warns_and_records_diagnostics(zoo, scratch, tmp_path):
    from hf_soup import cook

    result = cook(
        base=str(zoo["base"]),
        candidates=[str(zoo["a"]), str(zoo["b"]), str(scratch)],
        recipe="uniform",
        output=str(tmp_path / "soup"),
        quiet=True,
    )
    assert list(result.report["diagnostics"]["flagged"]) == [str(scratch)]
    assert any(str(scratch) in w for w in result.report["warnings"])
    card = (tmp_path / "soup" / "README.md").read_text()
    assert "Shared initialisation" in card and "does not look fine-tuned" in card
