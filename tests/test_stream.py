"""`--stream`: Hub checkpoints read tensor by tensor with HTTP Range requests, never stored.

A family of tiny Llama causal LMs (bf16, sharded, tied embeddings) lives on the local test Hub; the real CLI and the
unmodified `huggingface_hub` client read it. Each test checks what a user at LLM scale relies on: the same soup as a
download, no weight file on disk (the access log and a disk-usage sampler), and a dropped connection either
recovered or reported once with nothing written.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest
import torch
from conftest import installed_script
from hub_server import TRUNCATE, HubServer
from safetensors import safe_open
from test_hub import hub_env
from transformers import LlamaConfig, LlamaForCausalLM

from hf_soup import SoupConfig
from hf_soup.checkpoints.ranged import HubBytes
from hf_soup.errors import ConfigError

HF_SOUP = installed_script("hf-soup")
SHARD = r"^/org/llama-ft-1/resolve/[0-9a-f]+/model-00001-of-\d+\.safetensors$"


def llama(seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=2048,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    if seed:
        noise = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for tensor in model.state_dict().values():
                tensor.add_((1e-2 * torch.randn(tensor.shape, generator=noise)).to(tensor.dtype))
    return model


@pytest.fixture
def hub(tmp_path):
    server = HubServer(tmp_path / "hub").start()
    for seed in range(4):
        folder = tmp_path / "seed" / str(seed)
        llama(seed).save_pretrained(folder, max_shard_size="200KB")
        if seed:
            (folder / "README.md").write_text("---\nbase_model: org/llama-base\n---\n")
        server.upload_folder("org/llama-base" if seed == 0 else f"org/llama-ft-{seed}", folder)
    yield server
    server.stop()


def model_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            found.update({name: handle.get_tensor(name) for name in handle.keys()})
    return found


def soup(hub, tmp_path, name: str, *extra: str) -> tuple[subprocess.CompletedProcess, int]:
    """Run a uniform soup of the three fine-tunes into `tmp_path/name`, sampling the bytes of every file under
    `tmp_path/name-disk` (its Hub cache and its output) while it runs; return the result and the peak."""
    disk = tmp_path / f"{name}-disk"
    env = hub_env(hub, disk)
    command = [
        HF_SOUP,
        "--base",
        "org/llama-base",
        "--candidates",
        "org/llama-ft-*",
        "--recipe",
        "uniform",
        "--output",
        str(disk / "out"),
        "--quiet",
        *extra,
    ]
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.wait(0.01):
            try:
                sizes = [p.stat().st_size for p in disk.rglob("*") if p.is_file() and not p.is_symlink()]
            except OSError:  # a file or the staging folder went away mid-walk: sample again
                continue
            peak[0] = max(peak[0], sum(sizes))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    finally:
        stop.set()
        sampler.join()
    return result, peak[0]


@pytest.mark.slow
def test_streamed_soup_equals_the_downloaded_one_and_stores_no_weights(hub, tmp_path):
    one_model = model_bytes(tmp_path / "seed" / "0")
    downloaded, downloaded_peak = soup(hub, tmp_path, "downloaded")
    assert downloaded.returncode == 0, downloaded.stderr
    hub.log.clear()

    streamed, streamed_peak = soup(hub, tmp_path, "streamed", "--stream")
    assert streamed.returncode == 0, streamed.stderr
    ours, reference = (
        tensors(tmp_path / "streamed-disk" / "out"),
        tensors(tmp_path / "downloaded-disk" / "out"),
    )
    assert ours.keys() == reference.keys() and "lm_head.weight" not in ours  # still tied: embed_tokens only
    assert all(torch.equal(ours[name], reference[name]) for name in ours)
    # Every byte of weights came by Range request; none was stored.
    assert not [p for p in hub.requests("GET") if p.endswith(".safetensors")]
    ranged = hub.requests("GET-RANGE")
    for repo in ("llama-base", "llama-ft-1", "llama-ft-2", "llama-ft-3"):
        assert any(f"/org/{repo}/resolve/" in p and "model-00002-of-" in p for p in ranged), repo
    assert not list((tmp_path / "streamed-disk" / "hf_home").rglob("*.safetensors"))
    # Disk: the soup and small files, against base + candidates + soup for a download.
    assert streamed_peak < 1.2 * one_model, (streamed_peak, one_model)
    assert downloaded_peak > 4 * one_model, (downloaded_peak, one_model)


@pytest.mark.slow
def test_a_first_streamed_run_fetches_each_model_once_and_a_rerun_the_candidates(hub, tmp_path):
    """N + 1 models of traffic on a first run (verification and merge share every read), N on a rerun (the
    verdicts are cached; the base is not needed for a uniform soup): counted by the test Hub's bytes served."""

    def traffic() -> dict[str, int]:
        return {
            repo: hub.bytes_served(f"/org/{repo}/resolve/", ".safetensors")
            for repo in ("llama-base", "llama-ft-1", "llama-ft-2", "llama-ft-3")
        }

    def weights(seed: int) -> tuple[int, int]:  # (bytes of the weight files, how many files)
        files = list((tmp_path / "seed" / str(seed)).glob("*.safetensors"))
        return sum(p.stat().st_size for p in files), len(files)

    hub.served.clear()
    first, _ = soup(hub, tmp_path, "streamed", "--stream")
    assert first.returncode == 0, first.stderr
    first_traffic = traffic()
    hub.served.clear()
    rerun, _ = soup(hub, tmp_path, "streamed", "--stream", "--overwrite")
    assert rerun.returncode == 0, rerun.stderr
    rerun_traffic = traffic()
    for seed, repo in enumerate(first_traffic):
        size, files = weights(seed)
        headers = files * HubBytes.PREFIX_BYTES  # each file's first request, the header, may overlap a tensor
        assert size <= first_traffic[repo] <= size + headers, (repo, first_traffic[repo], size)  # once
        if seed:
            assert size <= rerun_traffic[repo] <= size + headers, (repo, rerun_traffic[repo], size)
        else:
            assert rerun_traffic[repo] <= headers, rerun_traffic  # the base's headers only
    assert size > headers  # so that reading a model twice could not pass for once


@pytest.mark.slow
def test_a_connection_dropped_mid_tensor_is_retried(hub, tmp_path):
    hub.inject("GET", SHARD, TRUNCATE, times=1, from_byte=1)  # a tensor read, not the header
    result, _ = soup(hub, tmp_path, "retried", "--stream")
    assert result.returncode == 0, result.stderr
    cut = [path for method, path, status in hub.log if status == TRUNCATE]
    assert len(cut) == 1 and (tmp_path / "retried-disk" / "out" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_connection_that_keeps_dropping_is_one_error_and_writes_nothing(hub, tmp_path):
    hub.inject("GET", SHARD, TRUNCATE, from_byte=1)
    result, _ = soup(hub, tmp_path, "failed", "--stream")
    assert result.returncode == 2
    assert result.stderr.count("hf-soup: error:") == 1 and "Traceback" not in result.stderr, result.stderr
    assert "failed after retries" in result.stderr and "nothing was written" in result.stderr
    assert sum(status == TRUNCATE for _, _, status in hub.log) > 1  # the client retried before giving up
    assert not [p.name for p in (tmp_path / "failed-disk").iterdir() if p.name.startswith((".out", "out"))]


def test_an_http_error_mid_stream_is_one_error_and_writes_nothing(hub, tmp_path):
    hub.inject("GET", SHARD, 403, from_byte=1)  # after the header was read: while writing the soup
    result, _ = soup(hub, tmp_path, "forbidden", "--stream")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("hf-soup: error:") == 1 and "HTTP 403" in result.stderr
    assert not [p.name for p in (tmp_path / "forbidden-disk").iterdir() if p.name.startswith((".out", "out"))]


@pytest.mark.slow
def test_a_streamed_candidate_with_nan_is_refused_with_nothing_written(hub, tmp_path):
    folder = tmp_path / "seed" / "nan"
    model = llama(9)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    model.save_pretrained(folder, max_shard_size="200KB")
    (folder / "README.md").write_text("---\nbase_model: org/llama-base\n---\n")
    hub.upload_folder("org/llama-ft-9", folder)
    result, _ = soup(hub, tmp_path, "nan", "--stream")
    assert result.returncode == 2 and "org/llama-ft-9 has NaN or Inf values" in result.stderr, result.stderr
    assert not [p.name for p in (tmp_path / "nan-disk").iterdir() if p.name.startswith((".out", "out"))]


def test_stream_refuses_scored_recipes():
    with pytest.raises(ConfigError, match="--stream"):
        SoupConfig(
            base="org/b",
            candidates=["org/*"],
            dataset="d.csv",
            text_column="t",
            label_column="l",
            recipe="greedy",
            stream=True,
        )
