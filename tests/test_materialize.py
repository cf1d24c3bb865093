"""The materializer and the workbench against independent averages."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import copy_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

from hf_soup.candidates.compat import check_compatibility
from hf_soup.checkpoints.stream_writer import SafetensorsStreamWriter
from hf_soup.merge import materialize as materialize_module
from hf_soup.merge.materialize import Workbench, materialize
from hf_soup.mixture import Ingredient, Mixture


def independent_average(folders, weights=None):
    states = [load_file(str(f / "model.safetensors")) for f in folders]
    weights = weights or [1 / len(states)] * len(states)
    out = {}
    for name in states[0]:
        if states[0][name].dtype.is_floating_point:
            out[name] = sum(w * s[name].double() for w, s in zip(weights, states))
        else:
            out[name] = states[0][name]
    return out


def test_uniform_soup_equals_independent_average(zoo, tmp_path):
    report, sources = check_compatibility(zoo["base"], [str(zoo["root"] / "runs" / "*")])
    mixture = Mixture.uniform("uniform", [c.id for c in report.accepted])
    stats = materialize(mixture, sources, tmp_path, quiet=True)
    written = load_file(str(tmp_path / "model.safetensors"))
    expected = independent_average([zoo[k] for k in "abcd"])
    assert set(written) == set(expected)
    for name, tensor in written.items():
        assert not torch.isnan(tensor.float()).any()
        torch.testing.assert_close(tensor.double(), expected[name].to(torch.float64), atol=1e-6, rtol=0)
    assert stats.files == ["model.safetensors"]


def test_non_uniform_weights(zoo, tmp_path):
    _report, sources = check_compatibility(zoo["base"], [str(zoo["a"]), str(zoo["b"])])
    mixture = Mixture("custom", (Ingredient(str(zoo["a"]), 0.25), Ingredient(str(zoo["b"]), 0.75)))
    materialize(mixture, sources, tmp_path, quiet=True)
    written = load_file(str(tmp_path / "model.safetensors"))
    expected = independent_average([zoo["a"], zoo["b"]], [0.25, 0.75])
    for name in written:
        torch.testing.assert_close(
            written[name].double(), expected[name].to(torch.float64), atol=1e-6, rtol=0
        )


def halved(source, target):
    folder = copy_model(source, target)
    state = load_file(str(folder / "model.safetensors"))
    save_file(
        {k: v.half() if v.is_floating_point() else v for k, v in state.items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return folder, state


def test_mixed_dtypes_accumulate_in_fp32_and_write_float32(zoo, tmp_path):
    half, state = halved(zoo["b"], tmp_path / "half")
    report, sources = check_compatibility(zoo["base"], [str(zoo["a"]), str(half)])
    assert any("mix dtypes" in w for w in report.warnings)
    out = tmp_path / "out"
    out.mkdir()
    materialize(Mixture.uniform("uniform", [str(zoo["a"]), str(half)]), sources, out, quiet=True)
    written = load_file(str(out / "model.safetensors"))
    a = load_file(str(zoo["a"] / "model.safetensors"))
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert written[name].dtype == torch.float32  # the candidates disagree: float32
    expected = (a[name] + state[name].half().float()) / 2
    torch.testing.assert_close(written[name], expected, atol=1e-6, rtol=0)


def test_candidates_common_dtype_is_written_whatever_the_base(zoo, tmp_path):
    folders = [halved(zoo[k], tmp_path / k)[0] for k in "ab"]  # float16 candidates of a float32 base
    _report, sources = check_compatibility(zoo["base"], [str(f) for f in folders])
    out = tmp_path / "out"
    out.mkdir()
    materialize(Mixture.uniform("uniform", [str(f) for f in folders]), sources, out, quiet=True)
    written = load_file(str(out / "model.safetensors"))
    states = [load_file(str(f / "model.safetensors")) for f in folders]
    for name, tensor in written.items():
        if states[0][name].is_floating_point():
            assert tensor.dtype == torch.float16  # theirs, not the base's float32
            expected = ((states[0][name].double() + states[1][name].double()) / 2).half()
            torch.testing.assert_close(tensor, expected, atol=0, rtol=0)  # the fp32 mean, rounded once


def test_non_float_buffers_are_copied_and_shards_indexed(zoo, tmp_path):
    with_buffer = []
    for key in "ab":
        folder = copy_model(zoo[key], tmp_path / key)
        state = load_file(str(folder / "model.safetensors"))
        state["bert.embeddings.position_ids"] = torch.arange(128).unsqueeze(0) + (7 if key == "b" else 0)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        with_buffer.append(folder)
    _report, sources = check_compatibility(zoo["base"], [str(f) for f in with_buffer])
    out = tmp_path / "out"
    out.mkdir()
    stats = materialize(
        Mixture.uniform("u", [str(f) for f in with_buffer]),
        sources,
        out,
        max_shard_size="200KB",
        quiet=True,
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and "model.safetensors.index.json" in stats.files
    merged = {}
    for shard in set(index["weight_map"].values()):
        merged.update(load_file(str(out / shard)))
    assert torch.equal(
        merged["bert.embeddings.position_ids"], torch.arange(128).unsqueeze(0)
    )  # first ingredient's
    (out / "config.json").write_text((zoo["a"] / "config.json").read_text())
    model = AutoModelForSequenceClassification.from_pretrained(out)  # transformers reads the sharded index
    torch.testing.assert_close(model.classifier.weight, merged["classifier.weight"])


def test_peak_memory_does_not_grow_with_candidates(zoo, tmp_path):
    peaks = {}
    for n in (2, 4):
        ids = [str(zoo[k]) for k in "abcd"[:n]]
        _report, sources = check_compatibility(zoo["base"], ids)
        out = tmp_path / f"n{n}"
        out.mkdir()
        stats = materialize(Mixture.uniform("u", ids), sources, out, max_shard_size="100KB", quiet=True)
        peaks[n] = stats.peak_live_bytes
        largest = max(
            torch.Size(sources.candidates[ids[0]].shape(k)).numel() * 4
            for k in sources.candidates[ids[0]].keys()
        )
        # One accumulator, one input and one output tensor (and the 1 MB conversion block): never N models,
        # never a shard.
        assert stats.peak_live_bytes <= 3 * largest + materialize_module.MIX_BLOCK * 4
    assert peaks[2] == peaks[4]


def test_mixing_in_blocks_gives_the_bits_of_converting_each_tensor_whole(zoo, tmp_path, monkeypatch):
    # 7 entries per block: every tensor spans many blocks and most end in a partial one.
    monkeypatch.setattr(materialize_module, "MIX_BLOCK", 7)
    ids = [str(zoo[k]) for k in "abc"]
    weights = {ids[0]: 0.5, ids[1]: 0.3, ids[2]: 0.2}
    _report, sources = check_compatibility(zoo["base"], ids)
    materialize(
        Mixture("w", tuple(Ingredient(c, w) for c, w in weights.items())), sources, tmp_path, quiet=True
    )
    merged = load_file(tmp_path / "model.safetensors")
    inputs = [load_file(zoo[k] / "model.safetensors") for k in "abc"]
    for name, value in merged.items():
        if not value.is_floating_point():
            continue
        expected = inputs[0][name].to(torch.float32) * weights[ids[0]]
        for cid, tensors in zip(ids[1:], inputs[1:]):
            expected.add_(tensors[name].to(torch.float32), alpha=weights[cid])
        assert torch.equal(value, expected.to(value.dtype)), name


def test_each_tensor_is_on_disk_before_the_next_is_mixed(zoo, tmp_path, monkeypatch):
    ids = [str(zoo[k]) for k in "ab"]
    _report, sources = check_compatibility(zoo["base"], ids)
    shard, seen = tmp_path / "model.safetensors", []
    real = materialize_module.mix_tensor

    def watched(mixture, sources, name):
        seen.append(shard.stat().st_size if shard.exists() else 0)  # what is already written
        return real(mixture, sources, name)

    monkeypatch.setattr(materialize_module, "mix_tensor", watched)
    stats = materialize(Mixture.uniform("u", ids), sources, tmp_path, quiet=True)  # one shard
    assert stats.files == ["model.safetensors"] and seen == sorted(seen)
    last = load_file(str(shard))
    # By the last tensor, all the others are in the file (save_file would have written nothing yet).
    written_before_last = sum(t.numel() * t.element_size() for t in last.values()) - max(
        t.numel() * t.element_size() for t in last.values()
    )
    assert seen[-1] >= written_before_last - 64 * 1024  # give or take the write buffer


def test_streamed_shards_read_like_save_file(tmp_path):
    tensors = {
        "b.weight": torch.randn(3, 5, dtype=torch.bfloat16),
        "a.bias": torch.randn(7),
        "ids": torch.arange(5),
        "h": torch.randn(2, 3, dtype=torch.float16),
        "mask": torch.tensor([True, False, True]),
    }
    planned = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in tensors.items()}
    with SafetensorsStreamWriter(
        tmp_path / "streamed.safetensors", planned, metadata={"format": "pt"}
    ) as writer:
        for name in writer.order:
            writer.write(name, tensors[name])
    save_file(tensors, str(tmp_path / "saved.safetensors"), metadata={"format": "pt"})
    streamed, saved = (
        load_file(str(tmp_path / "streamed.safetensors")),
        load_file(str(tmp_path / "saved.safetensors")),
    )
    assert streamed.keys() == saved.keys()
    for name, tensor in saved.items():
        assert streamed[name].dtype == tensor.dtype and torch.equal(streamed[name], tensor)
    with safe_open(str(tmp_path / "streamed.safetensors"), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    raw = (tmp_path / "streamed.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    for name, info in header.items():  # every tensor starts at a multiple of its element size
        if name != "__metadata__":
            assert info["data_offsets"][0] % tensors[name].element_size() == 0
    with pytest.raises(ValueError, match="expected"):  # out of order
        SafetensorsStreamWriter(tmp_path / "x.safetensors", planned).write("h", tensors["h"])
    with (
        pytest.raises(ValueError, match="never written"),
        SafetensorsStreamWriter(tmp_path / "y.safetensors", planned),
    ):
        pass


def test_workbench_trials_match_direct_average(zoo):
    ids = [str(zoo[k]) for k in "abcd"]
    _report, sources = check_compatibility(zoo["base"], ids)
    model = AutoModelForSequenceClassification.from_pretrained(zoo["a"])
    bench = Workbench(model, sources)
    for subset in (ids[:2], ids[:3], [ids[0], ids[1], ids[3]], ids, [ids[2]], ids[1:]):
        bench.load(Mixture.uniform("t", subset))
        expected = independent_average([zoo[k] for k in "abcd" if str(zoo[k]) in subset])
        state = model.state_dict()
        for name in bench.names:
            torch.testing.assert_close(
                state[name].double(), expected[name].to(torch.float64), atol=1e-6, rtol=0
            )


def written(mixture, report, sources, folder, dtype=None) -> dict[str, torch.Tensor]:
    folder.mkdir()
    materialize(mixture, sources, folder, dtype=dtype, quiet=True)
    return load_file(str(folder / "model.safetensors"))


def test_the_workbench_scores_exactly_what_is_written(zoo, tmp_path):
    """After any sequence of trials, a single candidate is its checkpoint bit for bit, and a soup (uniform, or
    weights that do not sum to 1, in float32 or bf16) holds exactly the tensors `materialize` writes."""
    ids = [str(zoo[k]) for k in "abcd"]
    report, sources = check_compatibility(zoo["base"], ids)
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForSequenceClassification.from_pretrained(zoo["a"], dtype=dtype)
        bench = Workbench(model, sources)
        trials = [Mixture.uniform("t", ids[:2]), Mixture.uniform("t", ids[:3]), Mixture.uniform("t", ids[1:])]
        unnormalised = Mixture("t", (Ingredient(ids[0], 1.0), Ingredient(ids[2], 1.0)))
        for step, mixture in enumerate([*trials, unnormalised, Mixture.uniform("t", ids[:3])]):
            bench.load(mixture)
            expected = written(mixture, report, sources, tmp_path / f"{dtype}-{step}", dtype)
            state = model.state_dict()
            for name in bench.names:
                assert torch.equal(state[name], expected[name]), (dtype, step, name)
        for key in "abcd":  # a single candidate is scored as itself
            bench.load(Mixture.uniform("single", [str(zoo[key])]))
            checkpoint = load_file(str(zoo[key] / "model.safetensors"))
            state = model.state_dict()
            for name in bench.names:
                assert torch.equal(state[name], checkpoint[name].to(dtype)), (key, name)
