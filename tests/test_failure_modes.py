"""The catalogue of bad inputs and faults (docs/reference/failure-modes.md): each one fails safely, and says what to do."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import time
from collections import namedtuple
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import copy_model, installed_script, tiny_config
from safetensors.torch import load_file, save_file
from test_compat import Payload, rewrite, to_pickle
from transformers import BertForMaskedLM

from hf_soup.cli import main

HF_SOUP = installed_script("hf-soup")


def data_args(reviews, fraction="0.25"):
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
        fraction,
    ]


def fails(argv, message, capsys, output: Path | None = None) -> str:
    """Run the CLI; it must exit 2 with exactly one error line containing `message`, and write nothing."""
    code = main([*argv, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("hf-soup: error:") == 1 and "Traceback" not in err, err
    assert message in err, err
    if output is not None:
        assert not output.exists() and not list(output.parent.glob(f".{output.name}.*"))
    return err


def strict_check(zoo, bad: Path) -> list[str]:
    """`hf-soup check --strict` of two genuine fine-tunes and `bad`: a rejection of `bad` is fatal."""
    return [
        "check",
        "--base",
        str(zoo["base"]),
        "--candidates",
        str(zoo["a"]),
        str(zoo["c"]),
        str(bad),
        "--strict",
    ]


@pytest.fixture
def hang_guard():
    """Fail instead of hanging: a bad file must never make a read block or loop."""

    def timeout(*_):
        raise TimeoutError("hung for 60 s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# --- 1. pickles ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("allow_pickle", [False, True])
def test_pickle_payload_never_runs(zoo, tmp_path, capsys, allow_pickle):
    marker = tmp_path / "pwned"
    evil = to_pickle(copy_model(zoo["c"], tmp_path / "evil"), Payload(str(marker)))
    argv = [
        "check",
        "--base",
        str(zoo["base"]),
        "--candidates",
        str(zoo["a"]),
        str(zoo["b"]),
        str(evil),
        "--strict",
    ]
    reason = "weights_only" if allow_pickle else "--allow-pickle"
    fails([*argv, *(["--allow-pickle"] if allow_pickle else [])], reason, capsys)
    assert not marker.exists()


# --- 2. corrupt safetensors ---------------------------------------------------------------------------------


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def _write_header(path: Path, header: dict, data: bytes) -> None:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def lie_about_shape(path: Path) -> None:
    header, data = _header(path)
    header["classifier.bias"]["shape"] = [4096]  # offsets still say 2 floats
    _write_header(path, header, data)


def lie_about_offsets(path: Path) -> None:
    header, data = _header(path)
    start, end = header["classifier.bias"]["data_offsets"]
    header["classifier.bias"]["data_offsets"] = [start, end + 10**9]
    _write_header(path, header, data)


def huge_header_length(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**60) + raw[8:])


@pytest.mark.parametrize("corrupt", [truncate, lie_about_shape, lie_about_offsets, huge_header_length])
def test_corrupt_safetensors_is_a_clear_error_not_a_crash_or_hang(zoo, tmp_path, capsys, hang_guard, corrupt):
    bad = copy_model(zoo["b"], tmp_path / "bad")
    corrupt(bad / "model.safetensors")
    argv = strict_check(zoo, bad)
    fails(argv, "is not a valid safetensors file", capsys)


# --- 3. untrusted code --------------------------------------------------------------------------------------


def test_custom_code_is_refused_unless_trusted(zoo, tmp_path, capsys):
    custom = rewrite(
        copy_model(zoo["b"], tmp_path / "custom"),
        change_config=lambda c: c.update(auto_map={"AutoModel": "modeling.Evil"}),
    )
    (custom / "modeling.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w')\n")
    argv = ["check", "--base", str(zoo["base"]), "--candidates", str(zoo["a"]), str(custom), "--strict"]
    fails(argv, "custom code (auto_map)", capsys)
    assert main([*argv, "--trust-remote-code", "--quiet"]) == 0  # the flag is the only way in
    capsys.readouterr()
    base = rewrite(
        copy_model(zoo["base"], tmp_path / "base"),
        change_config=lambda c: c.update(auto_map={"AutoModel": "m.X"}),
    )
    fails(["check", "--base", str(base), "--candidates", str(zoo["a"]), str(zoo["b"])], "The base", capsys)
    assert not (tmp_path / "pwned").exists()


# --- 4. weights that cannot be averaged ---------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")])
def test_inf_or_nan_weights_are_refused(zoo, tmp_path, capsys, value):
    bad = rewrite(
        copy_model(zoo["b"], tmp_path / "inf"),
        change_state=lambda s: s["classifier.weight"].__setitem__((1, 3), value),
    )
    out = tmp_path / "soup"
    argv = [
        "--base",
        str(zoo["base"]),
        "--candidates",
        str(zoo["a"]),
        str(bad),
        "--recipe",
        "uniform",
        "--output",
        str(out),
    ]
    fails(argv, "NaN or Inf values in classifier.weight", capsys, out)


def test_a_vocabulary_padded_to_a_multiple_of_64_is_aligned_not_rejected(zoo, tmp_path, capsys):
    def grow(state):
        table = state["bert.embeddings.word_embeddings.weight"]
        state["bert.embeddings.word_embeddings.weight"] = torch.cat([table, torch.zeros(8, table.shape[1])])

    padded = rewrite(copy_model(zoo["b"], tmp_path / "resized"), grow, lambda c: c.update(vocab_size=30530))
    assert main([*strict_check(zoo, padded), "--format", "json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        str(padded) in report["accepted"] and report["vocab"]["rows"] == 30522
    )  # the base's rows (vocab.py)


def test_a_resized_layer_that_is_not_the_vocabulary_is_rejected(zoo, tmp_path, capsys):
    def grow(state):
        table = state["bert.embeddings.position_embeddings.weight"]
        state["bert.embeddings.position_embeddings.weight"] = torch.cat(
            [table, torch.zeros(8, table.shape[1])]
        )

    bad = rewrite(
        copy_model(zoo["b"], tmp_path / "resized"), grow, lambda c: c.update(max_position_embeddings=520)
    )
    fails(strict_check(zoo, bad), "position_embeddings.weight has shape", capsys)


def test_a_tokenizer_with_tokens_at_other_ids_is_aligned_by_token(zoo, tmp_path, capsys):
    same = copy_model(zoo["c"], tmp_path / "same-tokenizer")
    other = copy_model(zoo["b"], tmp_path / "other-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(zoo["base"] / name, same / name)
        shutil.copy(zoo["base"] / name, other / name)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["good"], vocab["bad"] = vocab["bad"], vocab["good"]  # same size, two tokens swapped
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    argv = ["check", "--base", str(zoo["base"]), "--candidates", str(zoo["a"]), str(same), str(other)]
    assert main([*argv, "--format", "json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        sorted(report["accepted"]) == sorted([str(zoo["a"]), str(same), str(other)])
        and not report["rejected"]
    )
    assert report["vocab"]["rows"] == 30522 and not report["vocab"]["dropped"]  # rows matched by token string


def test_tied_and_untied_output_embeddings_are_not_mixed(zoo, tmp_path, capsys):
    folders = []
    for name, tied in (("tied-1", True), ("tied-2", True), ("untied", False)):
        torch.manual_seed(len(folders))
        BertForMaskedLM(tiny_config(tie_word_embeddings=tied)).save_pretrained(tmp_path / name)
        folders.append(str(tmp_path / name))
    assert (
        main(["check", "--base", str(zoo["base"]), "--candidates", *folders, "--format", "json", "--quiet"])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["accepted"] == folders[:2]
    (rejected,) = report["rejected"]
    assert rejected["id"] == folders[2] and "tie_word_embeddings is False" in rejected["reason"]


# --- 5. labels and splits -----------------------------------------------------------------------------------


def test_dataset_labels_the_models_do_not_know(zoo, reviews, tmp_path, capsys):
    test = pd.read_csv(reviews["test"])
    test.loc[0, "score"] = "terrible"
    test.to_csv(tmp_path / "test.csv", index=False)
    out = tmp_path / "soup"
    argv = [
        "--base",
        str(zoo["base"]),
        "--candidates",
        str(zoo["a"]),
        str(zoo["b"]),
        *data_args(reviews),
        "--report-split",
        str(tmp_path / "test.csv"),
        "--output",
        str(out),
    ]
    fails(argv, "labels the models do not know: terrible", capsys, out)


def test_an_empty_split(zoo, reviews, tmp_path, capsys):
    pd.read_csv(reviews["test"]).head(0).to_csv(tmp_path / "empty.csv", index=False)
    out = tmp_path / "soup"
    argv = [
        "--base",
        str(zoo["base"]),
        "--candidates",
        str(zoo["a"]),
        str(zoo["b"]),
        *data_args(reviews),
        "--report-split",
        str(tmp_path / "empty.csv"),
        "--output",
        str(out),
    ]
    fails(argv, "empty", capsys, out)


def test_a_selection_split_too_small_to_tell_candidates_apart_warns(zoo, reviews, tmp_path, capsys):
    """4 selection examples, fewer than one batch: the soup is made, and the report says the split cannot decide."""
    from test_claims import with_constant_head

    # Two candidates that predict the same label everywhere: no spread at all between their selection scores.
    runs = [
        with_constant_head(zoo[k], tmp_path / k, bias) for k, bias in (("a", [1.0, 0.0]), ("b", [2.0, 0.0]))
    ]
    out = tmp_path / "soup"
    argv = [
        "--base",
        str(zoo["base"]),
        "--candidates",
        *map(str, runs),
        *data_args(reviews, "0.01"),
        "--output",
        str(out),
        "--format",
        "json",
        "--quiet",
    ]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["splits"]["selection"]["size"] == 4
    assert any("too small to tell these candidates apart" in w for w in report["warnings"])
    assert (out / "model.safetensors").is_file()


def test_a_text_base_without_tokenizer_files(zoo, reviews, tmp_path, capsys):
    """transformers would build an empty tokenizer from config.json alone; hf-soup refuses to score with it."""
    base = tmp_path / "base"
    shutil.copytree(
        zoo["base"], base, ignore=shutil.ignore_patterns("tokenizer*", "vocab.txt", "special_tokens_map.json")
    )
    out = tmp_path / "soup"
    argv = [
        "--base",
        str(base),
        "--candidates",
        str(zoo["a"]),
        str(zoo["b"]),
        *data_args(reviews),
        "--output",
        str(out),
    ]
    fails(argv, "has tokenizer files; save the tokenizer next to the base model", capsys, out)


# --- 6. disk full -------------------------------------------------------------------------------------------


def test_not_enough_disk_space_is_caught_before_writing(zoo, tmp_path, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(
        "hf_soup.pipeline.output.shutil.disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000)
    )
    out = tmp_path / "soup"
    argv = [
        "--base",
        str(zoo["base"]),
        "--candidates",
        str(zoo["a"]),
        str(zoo["b"]),
        "--recipe",
        "uniform",
        "--output",
        str(out),
    ]
    err = fails(argv, "Not enough disk space", capsys, out)
    size_mb = (zoo["a"] / "model.safetensors").stat().st_size / 1e6
    assert f"need about {size_mb:.1f} MB" in err


def test_disk_filling_up_while_writing_leaves_nothing(zoo, tmp_path, capsys, monkeypatch):
    def full_disk(writer, name, tensor):
        with open(writer.path, "ab") as shard:
            shard.write(b"\0" * 1024)  # part of a tensor, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(writer.path))

    monkeypatch.setattr("hf_soup.checkpoints.stream_writer.SafetensorsStreamWriter.write", full_disk)
    out = tmp_path / "soup"
    argv = [
        "--base",
        str(zoo["base"]),
        "--candidates",
        str(zoo["a"]),
        str(zoo["b"]),
        "--recipe",
        "uniform",
        "--output",
        str(out),
    ]
    err = fails(argv, "The disk filled up while writing", capsys, out)
    assert "no partial folder was left" in err and "needs about" in err
    assert [p.name for p in tmp_path.iterdir() if p.name != "soup_cache"] == []  # at most the cache


# --- 7./8. interruption and concurrency ---------------------------------------------------------------------


def _cook_command(zoo, reviews, out: Path) -> list[str]:
    # Batches of one make each trial slow enough to be interrupted in the middle of the greedy search.
    return [
        HF_SOUP,
        "--base",
        str(zoo["base"]),
        "--candidates",
        str(zoo["root"] / "runs" / "*"),
        *data_args(reviews),
        "--recipe",
        "greedy",
        "--batch-size",
        "1",
        "--max-eval-examples",
        "48",
        "--bootstrap",
        "100",
        "--output",
        str(out),
        "--format",
        "json",
        "--quiet",
    ]


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "HF_SOUP_CACHE": str(cache)}


def _entries(cache: Path) -> list[Path]:
    return list(cache.rglob("*.json")) if cache.exists() else []


def _interrupt(command, cache: Path, after_entries: int, sig: int) -> tuple[subprocess.CompletedProcess, int]:
    # A shell starts background jobs with SIGINT ignored, and children inherit that; restore the default so the
    # child is interruptible the way a terminal's Ctrl-C would interrupt it.
    process = subprocess.Popen(
        command,
        env=_env(cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300
    while len(_entries(cache)) < after_entries and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), len(_entries(cache))


@pytest.mark.slow
def test_kill_9_during_a_greedy_soup_then_rerun_reuses_every_cached_score(zoo, reviews, tmp_path):
    reference = subprocess.run(
        _cook_command(zoo, reviews, tmp_path / "reference"),
        env=_env(tmp_path / "cache-ref"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert reference.returncode == 0, reference.stderr
    expected = json.loads(reference.stdout)

    cache, out = tmp_path / "cache", tmp_path / "soup"
    # 5 fingerprints, 4 single-model selection scores, then the first greedy trial: kill it mid-search.
    killed, cached = _interrupt(_cook_command(zoo, reviews, out), cache, 10, signal.SIGKILL)
    assert "Soup written" not in killed.stdout
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists() and not list(tmp_path.glob(".soup.*"))  # nothing half-written
    assert 10 <= cached < len(_entries(tmp_path / "cache-ref"))

    rerun = subprocess.run(
        _cook_command(zoo, reviews, out), env=_env(cache), capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr
    resumed = json.loads(rerun.stdout)
    assert (
        resumed["cache"]["hits"] >= cached
    )  # every entry written before the kill was read again, not recomputed
    assert resumed["cache"]["evaluations"] < expected["cache"]["evaluations"]
    assert resumed["mixture"]["ingredients"] == expected["mixture"]["ingredients"]
    assert resumed["tensor_sha256"] == expected["tensor_sha256"]


@pytest.mark.slow
def test_ctrl_c_says_nothing_was_written(zoo, reviews, tmp_path):
    out = tmp_path / "soup"
    interrupted, _ = _interrupt(_cook_command(zoo, reviews, out), tmp_path / "cache", 10, signal.SIGINT)
    assert interrupted.returncode == 130, interrupted.stderr[-3000:]
    assert "interrupted; nothing was written" in interrupted.stderr and "Traceback" not in interrupted.stderr
    assert not out.exists() and not list(tmp_path.glob(".soup.*"))


def test_ctrl_c_that_a_c_extension_turns_into_another_error_is_still_an_interrupt(monkeypatch, capsys):
    """A SIGINT inside safetensors' get_tensor can surface as a ValueError (seen in CI); it is still Ctrl-C."""

    def run_interrupted_inside_an_extension(args, argv):
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            raise ValueError(
                "could not determine the shape of object type 'torch.storage.UntypedStorage'"
            ) from None

    # A background launch (nohup, `&`) inherits SIGINT as ignored; this test needs Ctrl-C's usual handler.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    monkeypatch.setattr("hf_soup.cli._run", run_interrupted_inside_an_extension)
    try:
        code = main(["check", "--base", "b", "--candidates", "c"])
    finally:
        restored = signal.signal(signal.SIGINT, inherited)
    assert code == 130
    assert capsys.readouterr().err.strip() == "hf-soup: interrupted; nothing was written."
    assert restored is signal.default_int_handler  # hf-soup restored the handler it found

    def run_failing(args, argv):
        raise ValueError("a real bug")

    monkeypatch.setattr("hf_soup.cli._run", run_failing)  # without a SIGINT, a bug stays a bug
    with pytest.raises(ValueError, match="a real bug"):
        main(["check", "--base", "b", "--candidates", "c"])


@pytest.mark.slow
def test_two_runs_sharing_a_cache_at_the_same_time(zoo, reviews, tmp_path):
    cache = tmp_path / "cache"
    commands = [[*_cook_command(zoo, reviews, tmp_path / f"soup-{i}"), "--batch-size", "8"] for i in range(2)]
    runs = [
        subprocess.Popen(command, env=_env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for command in commands
    ]
    results = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err for _, err in results]
    first, second = (json.loads(out) for out, _ in results)
    assert first["tensor_sha256"] == second["tensor_sha256"]
    assert first["mixture"]["ingredients"] == second["mixture"]["ingredients"]
    for entry in _entries(cache):
        json.loads(entry.read_text())  # every entry is whole: writes are atomic renames
    assert not list(cache.rglob("*.tmp"))


# --- 11. scale ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fifty(zoo, tmp_path_factory) -> list[str]:
    """52 fine-tunes: the zoo's four, each with 13 small perturbations (as a large sweep would produce)."""
    root = tmp_path_factory.mktemp("fifty")
    folders = []
    for key in "abcd":
        state = load_file(str(zoo[key] / "model.safetensors"))
        for index in range(13):
            folder = root / f"{key}-{index:02d}"
            folder.mkdir()
            shutil.copy(zoo[key] / "config.json", folder / "config.json")
            generator = torch.Generator().manual_seed(index)
            noisy = {n: t + 1e-4 * torch.randn(t.shape, generator=generator) for n, t in state.items()}
            save_file(noisy, str(folder / "model.safetensors"), metadata={"format": "pt"})
            folders.append(str(folder))
    return folders


@pytest.mark.slow
def test_fifty_candidates_keep_memory_flat_and_output_readable(zoo, reviews, fifty, tmp_path, capsys):
    from hf_soup.candidates.compat import check_compatibility
    from hf_soup.merge.materialize import materialize
    from hf_soup.mixture import Mixture

    peaks = {}
    for count in (4, len(fifty)):
        _report, sources = check_compatibility(zoo["base"], fifty[:count])
        target = tmp_path / f"n{count}"
        target.mkdir()
        peaks[count] = materialize(
            Mixture.uniform("uniform", fifty[:count]), sources, target, quiet=True
        ).peak_live_bytes
    assert peaks[len(fifty)] == peaks[4]  # one accumulator and one input tensor, whatever N is

    assert (
        main(["check", "--base", str(zoo["base"]), "--candidates", *fifty, "--diagnostics", "--quiet"]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + 52 + 1 + 2 + 52 and max(map(len, lines)) < 140
    out = tmp_path / "soup"
    argv = [
        "--base",
        str(zoo["base"]),
        "--candidates",
        *fifty,
        *data_args(reviews),
        "--max-eval-examples",
        "32",
        "--batch-size",
        "32",
        "--recipe",
        "greedy",
        "--output",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    table = captured.out.splitlines()
    names = {Path(c).name for c in fifty}  # the table names each run by its folder
    assert sum(line.split(" ")[0] in names for line in table) == 52
    assert max(map(len, table)) < 200 and "Traceback" not in captured.err
    assert len(json.loads((out / "soup.json").read_text())["candidates"]) == 52


# --- 12. wrong paths ----------------------------------------------------------------------------------------


def test_wrong_paths(zoo, tmp_path, capsys):
    weights = str(zoo["a"] / "model.safetensors")
    fails(
        ["check", "--base", str(zoo["base"]), "--candidates", str(zoo["b"]), weights],
        "is a file; pass the model folder",
        capsys,
    )
    fails(
        [
            "check",
            "--base",
            str(zoo["base"] / "model.safetensors"),
            "--candidates",
            str(zoo["a"]),
            str(zoo["b"]),
        ],
        "is a file; pass the pretrained model's folder",
        capsys,
    )
    (tmp_path / "not-a-model").mkdir()
    fails(
        ["check", "--base", str(tmp_path / "not-a-model"), "--candidates", str(zoo["a"]), str(zoo["b"])],
        "has no config.json; it is not a transformers model folder",
        capsys,
    )


def test_path_traversal_in_repo_ids(zoo, tmp_path, capsys):
    out = tmp_path / "soup"
    argv = ["--base", str(zoo["base"]), "--candidates", str(zoo["a"]), str(zoo["b"]), "--recipe", "uniform"]
    fails([*argv, "--push-to", "org/..", "--output", str(out)], "is not a valid repo id", capsys, out)
    fails([*argv[:3], "org/../x", "--recipe", "uniform"], "No candidate folder matches org/../x", capsys)
