"""A first data-free run verifies its inputs and writes the soup from one read of each tensor (`single_pass.py`).

The bytes are counted through the readers (`SoupResult.bytes_read`) and compared with the inputs' tensor bytes,
computed here from the files' headers. What the single pass writes and decides is compared with the separate
passes it replaces: the written tensors with a rerun's (the plain path, bit for bit), the diagnostics with
`check_with_diagnostics`, and the refusals (duplicate, flagged, `--strict`, NaN) with their rules.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_soup import cook
from hf_soup.api import check_with_diagnostics
from hf_soup.errors import IncompatibleCandidatesError, NonFiniteWeightsError


def tensor_bytes(folder: Path) -> int:
    """Every tensor's bytes in a model folder, from the safetensors headers."""
    total = 0
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            for name in handle.keys():
                view = handle.get_slice(name)
                total += (
                    math.prod(view.get_shape())
                    * torch.empty(0, dtype=_dtype(view.get_dtype())).element_size()
                )
    return total


def _dtype(code: str) -> torch.dtype:
    return {"F32": torch.float32, "I64": torch.int64, "BF16": torch.bfloat16, "F16": torch.float16}[code]


def soup(base: Path, candidates: list[Path], output: Path, cache: Path, **options):
    return cook(
        base=str(base),
        candidates=[str(c) for c in candidates],
        recipe=options.pop("recipe", "uniform"),
        output=str(output),
        overwrite=True,
        cache_dir=str(cache),
        quiet=True,
        **options,
    )


def test_a_first_run_reads_every_input_tensor_once_and_a_rerun_only_the_candidates(zoo, tmp_path):
    candidates = [zoo[k] for k in "abc"]
    first = soup(zoo["base"], candidates, tmp_path / "first", tmp_path / "cache")
    inputs = tensor_bytes(zoo["base"]) + sum(tensor_bytes(c) for c in candidates)
    assert (
        sum(first.bytes_read.values()) == inputs
    )  # verification and merge together: one read, not two or more
    assert first.bytes_read["verify and merge"] == inputs

    rerun = soup(zoo["base"], candidates, tmp_path / "rerun", tmp_path / "cache")
    assert "verify and merge" not in rerun.bytes_read  # every verdict cached: the plain merge
    assert sum(rerun.bytes_read.values()) == sum(tensor_bytes(c) for c in candidates)  # the base is not read

    # The same soup either way, bit for bit, and the same manifest hashes.
    ours, plain = (
        load_file(str(tmp_path / "first" / "model.safetensors")),
        load_file(str(tmp_path / "rerun" / "model.safetensors")),
    )
    assert ours.keys() == plain.keys() and all(torch.equal(ours[k], plain[k]) for k in ours)
    assert first.written.tensor_sha256 == rerun.written.tensor_sha256


def test_the_single_pass_diagnostics_equal_the_separate_pass(zoo, tmp_path):
    candidates = [zoo[k] for k in "abcd"]
    first = soup(zoo["base"], candidates, tmp_path / "soup", tmp_path / "cache")
    _, separate = check_with_diagnostics(str(zoo["base"]), [str(c) for c in candidates], quiet=True)
    measured = first.summary.diagnostics
    assert measured["ids"] == separate.ids
    assert measured["tensors_compared"] == separate.tensors
    for cid in separate.ids:
        assert measured["relative_distance"][cid] == pytest.approx(separate.relative_distance[cid], rel=1e-9)
    np.testing.assert_allclose(
        np.asarray(measured["cosine"]), np.round(separate.cosine, 6), rtol=0, atol=1.5e-6
    )
    assert measured["base_norm"] == pytest.approx(separate.base_norm, rel=1e-12)

    # And both equal a plain float64 computation from the state dicts (the base is a BertModel: no `bert.`).
    base = {
        k: v.double()
        for k, v in load_file(str(zoo["base"] / "model.safetensors")).items()
        if v.is_floating_point()
    }
    deltas = []
    for candidate in candidates:
        state = load_file(str(candidate / "model.safetensors"))
        shared = {
            k: state[k].double() - base[k.removeprefix("bert.")]
            for k in state
            if k.removeprefix("bert.") in base
        }
        deltas.append(torch.cat([shared[k].reshape(-1) for k in sorted(shared)]))
    base_norm = float(torch.cat([t.reshape(-1) for t in base.values()]).norm())
    for cid, delta in zip(separate.ids, deltas):
        assert measured["relative_distance"][cid] == pytest.approx(float(delta.norm()) / base_norm, rel=1e-9)
    gram = torch.stack(deltas) @ torch.stack(deltas).T
    cosine = (gram / torch.outer(gram.diag().sqrt(), gram.diag().sqrt())).numpy()
    np.testing.assert_allclose(
        np.asarray(measured["cosine"]), cosine, rtol=0, atol=1e-6
    )  # rounded to 6 places


def test_a_duplicate_found_by_hashing_is_merged_once(zoo, tmp_path):
    copy = shutil.copytree(zoo["a"], tmp_path / "copy-of-a")
    result = soup(zoo["base"], [zoo["a"], copy, zoo["b"]], tmp_path / "soup", tmp_path / "cache")
    # One of the pair is rejected, whichever the order puts second.
    [rejected] = result.compatibility.to_dict()["rejected"]
    assert rejected["id"] in (str(copy), str(zoo["a"])) and "same content" in rejected["reason"]
    written = load_file(str(tmp_path / "soup" / "model.safetensors"))
    a, b = (load_file(str(zoo[k] / "model.safetensors")) for k in "ab")
    for name, tensor in written.items():  # the speculative 3-way average was rewritten as the 2-way one
        expected = (a[name].float() + b[name].float()) * 0.5 if tensor.is_floating_point() else a[name]
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "soup").glob("*.safetensors")) == ["model.safetensors"]


def test_a_flagged_candidate_stays_out_and_strict_writes_nothing(zoo, scratch, tmp_path):
    result = soup(zoo["base"], [zoo["a"], zoo["b"], scratch], tmp_path / "soup", tmp_path / "cache")
    assert set(result.summary.excluded) == {str(scratch)}
    kept = {i.id for i in result.mixture.ingredients if i.weight}
    assert kept == {str(zoo["a"]), str(zoo["b"])}
    plain = soup(zoo["base"], [zoo["a"], zoo["b"]], tmp_path / "plain", tmp_path / "other-cache")
    assert result.written.tensor_sha256 == plain.written.tensor_sha256

    with pytest.raises(IncompatibleCandidatesError, match="--strict"):
        soup(
            zoo["base"], [zoo["a"], zoo["b"], scratch], tmp_path / "strict", tmp_path / "cache3", strict=True
        )
    assert not (tmp_path / "strict").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".strict")]  # no staging folder left


def test_nan_in_a_candidate_is_refused_with_nothing_written_and_remembered(zoo, tmp_path):
    broken = shutil.copytree(zoo["b"], tmp_path / "broken")
    state = load_file(str(broken / "model.safetensors"))
    name = sorted(k for k in state if k.endswith("attention.self.value.weight"))[-1]
    state[name][0, 0] = float("nan")
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    for attempt in range(2):  # the second run is refused from the cached verdict
        with pytest.raises(NonFiniteWeightsError, match=name):
            soup(zoo["base"], [zoo["a"], broken], tmp_path / "soup", tmp_path / "cache")
        assert not (tmp_path / "soup").exists(), attempt
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".soup")]
