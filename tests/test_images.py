"""Image-classification soups on real Fashion-MNIST: a briefly pretrained ResNet (with BatchNorm) and fine-tunes.

Every number hf-soup reports is checked against an independent computation: plain transformers forward passes
with the soup's own image processor, scikit-learn / numpy metrics, and hand-computed BatchNorm statistics.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import fashion_mnist as fm  # scripts/fashion_mnist.py (conftest puts scripts/ on sys.path)
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, AutoModelForImageClassification

from hf_soup import SoupConfig, cook
from hf_soup.errors import ConfigError
from hf_soup.evaluation.data import carve_selection
from hf_soup.evaluation.metrics import compute_metrics
from hf_soup.scoring.batchnorm import BatchNormRecalibrator
from hf_soup.training.sweep import SweepVariant, sweep

POOL_ROWS, TEST_ROWS = 2000, 600
# Three fine-tunes with a seeded random head (constant learning rates, as a short budget wants).
VARIANTS = [
    SweepVariant("lr3e-3-seed0", 3e-3, 1, seed=0, scheduler="constant"),
    SweepVariant("lr1e-3-seed1-ep2", 1e-3, 2, seed=1, scheduler="constant"),
    SweepVariant("lr3e-3-seed2-aug", 3e-3, 1, seed=2, scheduler="constant", augment=True),
]


@pytest.fixture(scope="module")
def image_zoo(tmp_path_factory) -> dict[str, Path]:
    """Fashion-MNIST as parquet, a ResNet pretrained on 4000 other images, and three fine-tuned variants."""
    root = tmp_path_factory.mktemp("image_zoo")
    data = fm.write_dataset(root / "data", POOL_ROWS, TEST_ROWS)
    base = fm.pretrain(root / "base", rows=4000, quiet=True)
    sweep(
        base,
        str(data),
        task="image-classification",
        output=root,
        variants=VARIANTS,
        head="random",
        quiet=True,
    )
    runs = {v.name: root / "runs" / v.name for v in VARIANTS}
    return {"root": root, "data": data, "base": base, "runs": runs}


def image_config(zoo, output: Path, **overrides) -> SoupConfig:
    values = dict(
        base=str(zoo["base"]),
        candidates=[str(zoo["root"] / "runs" / "*")],
        task="image-classification",
        dataset=str(zoo["data"]),
        recipe="greedy",
        batch_size=100,
        bootstrap=200,
        output=str(output),
    )
    values.update(overrides)
    return SoupConfig.from_options(**values)


def logits_of(model_dir: Path, images) -> np.ndarray:
    """Logits computed without hf-soup: the folder's own image processor and model, in plain transformers."""
    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), 128):
            pixel_values = processor(images=images[start : start + 128], return_tensors="pt")["pixel_values"]
            out.append(model(pixel_values=pixel_values).logits.numpy())
    return np.concatenate(out)


def names_to_model_ids(model_dir: Path, data) -> np.ndarray:
    id2label = AutoModelForImageClassification.from_pretrained(model_dir).config.id2label
    index = {name: i for i, name in id2label.items()}
    names = data.features["label"].names
    return np.array([index[names[v]] for v in data["label"]])


@pytest.fixture(scope="module")
def image_run(image_zoo, tmp_path_factory):
    output = tmp_path_factory.mktemp("image_soup") / "soup"
    result = cook(image_config(image_zoo, output), quiet=True)
    return result, output


def test_image_soup_end_to_end_matches_independent_scores(image_zoo, image_run):
    result, output = image_run
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "soup.json", "README.md"} <= {
        p.name for p in output.iterdir()
    }
    report = result.report
    assert report["task"]["name"] == "image-classification"
    assert report["task"]["metrics"] == ["accuracy", "top5_accuracy"]  # 10 classes > 5
    assert report["splits"]["report"] == {"test": {"size": TEST_ROWS}}

    test = datasets.load_dataset(str(image_zoo["data"]), split="test")
    labels = names_to_model_ids(output, test)
    logits = logits_of(output, list(test["image"]))
    accuracy = float(np.mean(logits.argmax(1) == labels))
    top5 = float(np.mean([label in np.argsort(-row)[:5] for row, label in zip(logits, labels)]))
    assert report["soup"]["report"]["test"]["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert report["soup"]["report"]["test"]["top5_accuracy"] == pytest.approx(top5, abs=1e-9)

    # The written weights are the mixture's weighted average of the candidates, and greedy never loses on selection.
    kept = {i["id"]: i["weight"] for i in report["mixture"]["ingredients"] if i["weight"]}
    states = {cid: load_file(str(Path(cid) / "model.safetensors")) for cid in kept}
    soup = load_file(str(output / "model.safetensors"))
    for name, tensor in soup.items():
        if tensor.is_floating_point():
            expected = sum(w * states[cid][name].double() for cid, w in kept.items())
            torch.testing.assert_close(tensor.double(), expected, atol=1e-6, rtol=0)
    # The soup's selection loss is its written folder's cross-entropy on hf-soup's seeded carve-out of train.
    _, selection = carve_selection(datasets.load_dataset(str(image_zoo["data"]), split="train"), 0.1, seed=0)
    logits = torch.from_numpy(logits_of(output, list(selection["image"]))).double()
    targets = torch.from_numpy(names_to_model_ids(output, selection))
    loss = float(torch.nn.functional.cross_entropy(logits, targets))
    assert report["soup"]["selection_loss"] == pytest.approx(loss, rel=1e-4)

    # Each candidate's reported score is its own forward pass, too.
    for candidate in report["candidates"][:1]:
        own = logits_of(Path(candidate["id"]), list(test["image"]))
        assert candidate["report"]["test"]["accuracy"] == pytest.approx(np.mean(own.argmax(1) == labels))


def test_top5_metric_matches_a_direct_count():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 10)).astype(np.float32)
    labels = rng.integers(0, 10, size=500)
    direct = np.mean([label in np.argsort(-row)[:5] for row, label in zip(logits, labels)])
    metrics = compute_metrics(("accuracy", "top5_accuracy"), logits.argmax(1), labels, scores=logits)
    assert metrics["top5_accuracy"] == pytest.approx(direct, abs=1e-12)
    assert metrics["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == labels), abs=1e-12)
    logits[np.arange(500), labels] = 100.0  # every true label on top: both are 1
    metrics = compute_metrics(("accuracy", "top5_accuracy"), logits.argmax(1), labels, scores=logits)
    assert metrics == {"accuracy": 1.0, "top5_accuracy": 1.0}


def _permuted_copy(source: Path, target: Path, permutation: list[int]) -> Path:
    """The same model with its labels stored in another order: head rows and id2label permuted together."""
    shutil.copytree(source, target)
    state = load_file(str(source / "model.safetensors"))
    for name in ("classifier.1.weight", "classifier.1.bias"):
        state[name] = state[name][permutation].contiguous()
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    names = [config["id2label"][str(i)] for i in permutation]
    config["id2label"] = {str(i): n for i, n in enumerate(names)}
    config["label2id"] = {n: i for i, n in enumerate(names)}
    (target / "config.json").write_text(json.dumps(config))
    return target


def _imagefolder(data: Path, target: Path, rows: int) -> Path:
    """The same images as PNG files under `split/<label name>/`: imagefolder sorts labels alphabetically."""
    for split in ("train", "test"):
        frame = datasets.load_dataset(str(data), split=split).select(range(rows))
        names = frame.features["label"].names
        for index, (image, label) in enumerate(zip(frame["image"], frame["label"])):
            folder = target / split / names[label]
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{index:05d}.png")
    return target


def test_label_alignment_holds_for_images(image_zoo, tmp_path):
    """A candidate storing its labels in another order, scored on imagefolder data whose label ids follow yet
    another (alphabetical) order: scores and soup are those of the unpermuted candidates on the parquet data."""
    names = sorted(image_zoo["runs"])
    first, second = (image_zoo["runs"][n] for n in names[:2])
    permutation = [3, 7, 0, 9, 1, 5, 2, 8, 4, 6]
    pot = tmp_path / "pot"
    shutil.copytree(first, pot / "a")
    _permuted_copy(second, pot / "b", permutation)
    folder = _imagefolder(image_zoo["data"], tmp_path / "imagefolder", rows=300)
    assert datasets.load_dataset(str(folder), split="test").features["label"].names == sorted(fm.LABELS)

    aligned = cook(
        image_config(
            image_zoo,
            tmp_path / "aligned",
            candidates=[str(pot / "*")],
            dataset=str(folder),
            recipe="uniform",
            batch_size=25,
            bootstrap=50,
        ),
        quiet=True,
    )
    # The unpermuted pair, merged without data.
    cook(
        image_config(
            image_zoo,
            tmp_path / "reference",
            candidates=[str(first), str(second)],
            task=None,
            dataset=None,
            recipe="uniform",
        ),
        quiet=True,
    )
    assert aligned.report["compatibility"]["permuted"] == [str(pot / "b")]
    assert (
        tmp_path / "reference" / "preprocessor_config.json"
    ).is_file()  # a plain merge keeps the processor
    soup, expected = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("aligned", "reference"))
    for name in expected:
        torch.testing.assert_close(soup[name], expected[name], atol=1e-6, rtol=0)
    # Scores on the imagefolder data (alphabetical label ids) are each model's own, labels matched by name.
    own = {c["id"]: c["report"]["test"]["accuracy"] for c in aligned.report["candidates"]}
    images = datasets.load_dataset(str(folder), split="test")
    labels = names_to_model_ids(second, images)
    direct = float(np.mean(logits_of(second, list(images["image"])).argmax(1) == labels))
    assert own[str(pot / "b")] == pytest.approx(direct, abs=1e-9)
    assert own[str(pot / "a")] == pytest.approx(
        float(np.mean(logits_of(first, list(images["image"])).argmax(1) == names_to_model_ids(first, images)))
    )


def _hand_recalibrated(model_dir: Path, soup_state: dict, images, batches: int, batch_size: int) -> dict:
    """BatchNorm statistics by hand: each layer's per-batch input mean and unbiased variance, averaged."""
    model = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    model.load_state_dict(soup_state)
    processor = AutoImageProcessor.from_pretrained(model_dir)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    sums = {n: [torch.zeros(m.num_features, dtype=torch.float64)] * 2 for n, m in layers.items()}
    captured = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, n=n: captured.__setitem__(n, inp[0]))
        for n, m in layers.items()
    ]
    with torch.no_grad():
        for start in range(0, batches * batch_size, batch_size):
            # In train mode every layer normalises with its batch's own statistics, as during recalibration.
            pixel_values = processor(images=images[start : start + batch_size], return_tensors="pt")
            for layer in layers.values():
                layer.train()
            model(**pixel_values)
            for name, x in captured.items():
                x = x.double().transpose(0, 1).reshape(x.shape[1], -1)
                sums[name] = [sums[name][0] + x.mean(1), sums[name][1] + x.var(1, unbiased=True)]
    for hook in hooks:
        hook.remove()
    return {n: (s[0] / batches, s[1] / batches) for n, s in sums.items()}


def test_recalibrate_bn_writes_statistics_of_the_soup_on_selection_batches(image_zoo, tmp_path):
    batches, batch_size = 3, 50
    result = cook(
        image_config(
            image_zoo,
            tmp_path / "soup",
            recipe="uniform",
            recalibrate_bn=batches,
            batch_size=batch_size,
            bootstrap=50,
        ),
        quiet=True,
    )
    written = load_file(str(tmp_path / "soup" / "model.safetensors"))
    runs = sorted(image_zoo["runs"].values())
    averaged = {
        k: sum(load_file(str(r / "model.safetensors"))[k].double() for r in runs) / len(runs) for k in written
    }
    assert result.report["batchnorm"]["recalibrated_batches"] == batches

    # The selection split is hf-soup's seeded carve-out of train, in dataset order.
    pool = datasets.load_dataset(str(image_zoo["data"]), split="train")
    _, selection = carve_selection(pool, 0.1, seed=0)
    images = list(selection.select(range(batches * batch_size))["image"])
    state = {
        k: (v.to(written[k].dtype) if v.is_floating_point() else written[k]) for k, v in averaged.items()
    }
    expected = _hand_recalibrated(tmp_path / "soup", state, images, batches, batch_size)
    for layer, (mean, var) in expected.items():
        torch.testing.assert_close(written[f"{layer}.running_mean"].double(), mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(written[f"{layer}.running_var"].double(), var, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(
            written[f"{layer}.running_mean"].double(), averaged[f"{layer}.running_mean"]
        )
    # Weights are still the plain average; only the statistics were re-estimated.
    torch.testing.assert_close(
        written["classifier.1.weight"].double(), averaged["classifier.1.weight"], atol=1e-6, rtol=0
    )
    # The reported soup score is the recalibrated model's own score.
    test = datasets.load_dataset(str(image_zoo["data"]), split="test")
    logits = logits_of(tmp_path / "soup", list(test["image"]))
    accuracy = float(np.mean(logits.argmax(1) == names_to_model_ids(tmp_path / "soup", test)))
    assert result.report["soup"]["report"]["test"]["accuracy"] == pytest.approx(accuracy, abs=1e-9)


def test_recalibrate_bn_without_batchnorm_is_refused(zoo):
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(zoo["a"])
    recalibrate = BatchNormRecalibrator(split=None, collator=None, batches=2, batch_size=8)
    with pytest.raises(ConfigError, match="no BatchNorm layer"):
        recalibrate(model)


@pytest.mark.slow
def test_image_cli_and_evaluate_agree(image_zoo, image_run, tmp_path):
    """`hf-soup evaluate` on the written soup gives plain transformers' numbers, and the ones `cook` reported."""
    result, output = image_run
    test = datasets.load_dataset(str(image_zoo["data"]), split="test")
    logits = logits_of(output, list(test["image"]))
    labels = names_to_model_ids(output, test)
    direct = {
        "accuracy": float(np.mean(logits.argmax(1) == labels)),
        "top5_accuracy": float(np.mean([y in np.argsort(-row)[:5] for row, y in zip(logits, labels)])),
    }
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "hf_soup",
            "evaluate",
            str(output),
            "--task",
            "image-classification",
            "--dataset",
            str(image_zoo["data"]),
            "--format",
            "json",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    scores = json.loads(run.stdout)
    assert scores["test"]["metrics"] == pytest.approx(direct, abs=1e-9)
    assert scores["test"]["metrics"] == pytest.approx(result.report["soup"]["report"]["test"], abs=1e-9)


def test_image_task_without_dataset_is_refused():
    with pytest.raises(ConfigError, match="needs --dataset"):
        SoupConfig(base="b", candidates=["c"], task="image-classification")


def test_image_input_errors_are_one_clear_message(image_zoo, tmp_path):
    from hf_soup.errors import DatasetError

    with pytest.raises(DatasetError, match=r"no column 'picture'.*Set --image-column"):
        cook(image_config(image_zoo, tmp_path / "soup", image_column="picture"), quiet=True)
    assert not (tmp_path / "soup").exists()
    # A base and candidates without an image processor.
    pot = tmp_path / "pot"
    for name in ("base", *sorted(image_zoo["runs"])[:2]):
        source = image_zoo["base"] if name == "base" else image_zoo["runs"][name]
        shutil.copytree(source, pot / name, ignore=shutil.ignore_patterns("preprocessor_config.json"))
    config = image_config(image_zoo, tmp_path / "soup", base=str(pot / "base"), candidates=[str(pot / "lr*")])
    with pytest.raises(ConfigError, match=r"has an image processor.*save_pretrained"):
        cook(config, quiet=True)
    assert not (tmp_path / "soup").exists()


def test_large_splits_are_processed_on_access_with_the_same_pixels(image_zoo, monkeypatch):
    from hf_soup.evaluation import images

    data = datasets.load_dataset(str(image_zoo["data"]), split="test").select(range(50))
    processor = AutoImageProcessor.from_pretrained(image_zoo["base"])
    kept = images.ImageFeatures(data, "image", processor, "test", quiet=True)
    monkeypatch.setattr(images, "KEEP_PROCESSED_BYTES", 0)  # as if the split needed more than the budget
    lazy = images.ImageFeatures(data, "image", processor, "test", quiet=True)
    assert kept.kept is not None and lazy.kept is None
    for index in (0, 17, 49):
        direct = processor(images=[data[index]["image"]], return_tensors="pt")["pixel_values"][0]
        assert torch.equal(lazy[index]["pixel_values"], direct)
        assert torch.equal(kept[index]["pixel_values"], direct)


def test_recalibrate_bn_with_a_trainer_is_refused_before_any_work(tmp_path):
    config = SoupConfig(base=str(tmp_path / "missing"), candidates=["c"], recipe="uniform", recalibrate_bn=2)
    with pytest.raises(ConfigError, match=r"with cook\(trainer=\.\.\.\) pass the data as dataset="):
        cook(config, trainer=object())
