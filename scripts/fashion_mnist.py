"""A real image-soup setting, offline: Fashion-MNIST, a briefly pretrained small ResNet, and fine-tuned variants.

No pretrained image weights can be downloaded here, so the shared start is made the way the paper's are, only
smaller: pretrain a ResNet (transformers' `ResNetModel`, with BatchNorm) on one part of the training images,
then fine-tune variants from it with `hf_soup.training.sweep` (`task="image-classification"`) on another part. The pool is
written as parquet (`train.parquet`, `test.parquet`) with an `image` column and named labels, so
`hf-soup --task image-classification --dataset FOLDER` reads it like any `datasets` image dataset.

Data: the Debian package `dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`), read with numpy.
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hf_soup.errors import DemoError
from hf_soup.progress import progress_bar

logger = logging.getLogger(__name__)

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
# The original's "T-shirt/top" without the slash, so that the names can also be imagefolder directory names.
LABELS = [
    "T-shirt-top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
MEAN, STD = 0.2860, 0.3530  # of the Fashion-MNIST training images, in [0, 1]
PRETRAIN_ROWS = slice(30000, 60000)  # pretraining never sees the fine-tuning pool (rows from 0)


def read_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """`(images uint8 [N, 28, 28], labels int64 [N])` of `train` or `test` (the files' `t10k`)."""
    prefix = "train" if split == "train" else "t10k"
    images_path = DATA_DIR / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = DATA_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.is_file():
        raise DemoError(
            f"Fashion-MNIST is not installed ({images_path} is missing): run `apt-get install -y "
            "dataset-fashion-mnist`."
        )
    with gzip.open(images_path) as handle:  # IDX: a 16-byte header, then 28x28 uint8 images
        images = np.frombuffer(handle.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(labels_path) as handle:  # IDX: an 8-byte header, then one uint8 label per image
        labels = np.frombuffer(handle.read(), dtype=np.uint8, offset=8).astype(np.int64)
    return images, labels


def to_dataset(images: np.ndarray, labels: np.ndarray):
    """A `datasets.Dataset` with an `image` (Image) column and a named `label` (ClassLabel) column."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=LABELS)})
    return datasets.Dataset.from_dict({"image": _pil(images), "label": labels.tolist()}, features=features)


def _pil(images: np.ndarray) -> list:
    from PIL import Image

    return [Image.fromarray(image, mode="L") for image in images]


def write_dataset(folder: Path, pool_rows: int, test_rows: int) -> Path:
    """`folder/train.parquet` (the first `pool_rows` training images) and `folder/test.parquet`."""
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = read_split("train")
    to_dataset(images[:pool_rows], labels[:pool_rows]).to_parquet(str(folder / "train.parquet"))
    images, labels = read_split("test")
    to_dataset(images[:test_rows], labels[:test_rows]).to_parquet(str(folder / "test.parquet"))
    return folder


def image_processor():
    """Rescale to [0, 1] and normalise with Fashion-MNIST's statistics; 28x28, one channel, no resizing.

    The PIL backend, explicitly: the same pixels with or without torchvision installed.
    """
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(do_resize=False, image_mean=[MEAN], image_std=[STD])


def pixels(images) -> torch.Tensor:
    """`[N, 1, 28, 28]` training inputs from PIL images: the image processor's own output, as scoring sees it."""
    return image_processor()(images=list(images), return_tensors="pt")["pixel_values"]


def model_config(**kwargs):
    from transformers import ResNetConfig

    return ResNetConfig(
        num_channels=1,
        embedding_size=16,
        hidden_sizes=[16, 32, 64],
        depths=[1, 1, 1],
        layer_type="basic",
        downsample_in_first_stage=False,
        **kwargs,
    )


@dataclass(frozen=True)
class Variant:
    """One fine-tuning run: its hyperparameters."""

    name: str
    learning_rate: float
    seed: int
    epochs: int = 1
    weight_decay: float = 0.0
    label_smoothing: float = 0.0


def train(model, x: torch.Tensor, y: torch.Tensor, variant: Variant, batch_size: int = 64, quiet=False):
    """Plain AdamW epochs over `(x, y)`: a tiny model on pre-made tensors, where a Trainer would only add overhead."""
    generator = torch.Generator().manual_seed(variant.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=variant.learning_rate, weight_decay=variant.weight_decay
    )
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=variant.label_smoothing)
    steps = variant.epochs * ((len(x) + batch_size - 1) // batch_size)
    model.train()
    with progress_bar(total=steps, desc=f"Training {variant.name}", unit="step", quiet=quiet) as bar:
        for _ in range(variant.epochs):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), batch_size):
                index = order[start : start + batch_size]
                loss = loss_fn(model(pixel_values=x[index]).logits, y[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                bar.update(1)
    model.eval()
    return model


def pretrain(folder: Path, rows: int, epochs: int = 1, quiet: bool = False) -> Path:
    """The shared start: a ResNet trained briefly on `rows` images outside the fine-tuning pool, saved headless.

    Like a Hub backbone, it is saved as `ResNetModel` (no classifier) with its image processor.
    """
    from transformers import ResNetForImageClassification

    if (folder / "config.json").is_file():
        return folder
    images, labels = read_split("train")
    images, labels = images[PRETRAIN_ROWS][:rows], labels[PRETRAIN_ROWS][:rows]
    torch.manual_seed(1234)
    model = ResNetForImageClassification(model_config(num_labels=len(LABELS)))
    train(
        model,
        pixels(_pil(images)),
        torch.from_numpy(labels),
        Variant("pretrain", 3e-3, 1234, epochs),
        quiet=quiet,
    )
    model.resnet.save_pretrained(folder)
    image_processor().save_pretrained(folder)
    return folder
