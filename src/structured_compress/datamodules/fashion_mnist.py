"""Fashion-MNIST (60k train / 10k test, 28x28 grey) read from the original idx files, held in memory."""
from __future__ import annotations

import gzip
import logging
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import Dataset, random_split

from ..sources import network_available
from .common import DatasetNotFoundError, check_val_size, first_dir_with
from .loaders import ResumableDataLoader, make_loader

log = logging.getLogger(__name__)

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
MEAN, STD = 0.2860, 0.3530
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (optionally gzipped): magic, dims as big-endian int32, then uint8 data; a truncated
    or corrupt file is a ValueError naming it."""
    path = path if path.exists() else path.with_name(path.name + ".gz")
    opener = gzip.open if path.suffix == ".gz" else open
    fix = "delete it so the copy in another location (or a fresh download) is used"
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, OSError) as err:  # gzip stream cut short or not gzip at all
        raise ValueError(f"{path} is corrupt ({err}); {fix}") from err
    magic = int.from_bytes(data[:4], "big")
    if len(data) < 4 or magic >> 8 != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file (magic {magic:#x}); {fix}")
    ndim = magic & 0xFF
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + int(np.prod(shape))
    if len(data) != expected:
        raise ValueError(f"{path} is truncated or padded: {len(data)} bytes, its header {shape} needs {expected}; "
                         f"{fix}")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


class ImageTensorDataset(Dataset):
    """Normalized ``(1, 28, 28)`` float images and int labels, with optional random flip + shift."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool = False):
        self.images, self.labels, self.augment = images, labels, augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.augment:
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
            dx, dy = torch.randint(-2, 3, (2,)).tolist()
            image = torch.roll(image, shifts=(dy, dx), dims=(-2, -1))
        return image, self.labels[index]


class FashionMNISTDataModule(pl.LightningDataModule):
    """Looks in ``data_dir``, then the Debian package's folder, then downloads with torchvision if online."""

    num_classes = 10
    input_shape = (1, 28, 28)

    def __init__(self, data_dir: str = "data/", batch_size: int = 128, eval_batch_size: int = 512,
                 val_size: int = 5000, num_workers: int = 0, augment: bool = True, seed: int = 0,
                 allow_download: bool = True):
        super().__init__()
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.train_set = self.val_set = self.test_set = None

    def candidate_dirs(self) -> list[Path]:
        base = self.data_dir
        return [base / "fashion_mnist", base / "FashionMNIST" / "raw", base, SYSTEM_DIR]

    def locate(self) -> Path:
        """Directory holding the four idx files, downloading them if allowed and online."""
        found = first_dir_with(self.candidate_dirs(), FILES.values())
        if found is not None:
            return found
        if self.hparams.allow_download and network_available():
            from torchvision.datasets import FashionMNIST

            for train in (True, False):
                FashionMNIST(str(self.data_dir), train=train, download=True)
            found = first_dir_with(self.candidate_dirs(), FILES.values())
            if found is not None:
                return found
        raise DatasetNotFoundError(
            "Fashion-MNIST idx files not found. Looked in: "
            + ", ".join(str(p) for p in self.candidate_dirs())
            + ". Provide them one of three ways: (1) put the four *-idx?-ubyte[.gz] files in "
            f"{self.data_dir / 'fashion_mnist'} (paths.data_dir={self.data_dir}); (2) as root, "
            "`apt-get install dataset-fashion-mnist` (installs them in /usr/share/datasets/fashion-mnist); "
            "(3) run once on a machine with internet so torchvision downloads them into paths.data_dir."
        )

    def prepare_data(self) -> None:
        self.locate()

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        root = self.locate()
        arrays = {key: read_idx(root / name) for key, name in FILES.items()}

        def images(key: str) -> torch.Tensor:
            return ((torch.from_numpy(arrays[key].copy()).float() / 255 - MEAN) / STD).unsqueeze(1)

        full_train = ImageTensorDataset(images("train_images"),
                                        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
                                        augment=self.hparams.augment)
        generator = torch.Generator().manual_seed(self.hparams.seed)
        n_val = self.hparams.val_size
        check_val_size(n_val, len(full_train), "Fashion-MNIST")
        train_idx, val_idx = random_split(range(len(full_train)), [len(full_train) - n_val, n_val], generator=generator)
        self.train_set = torch.utils.data.Subset(full_train, list(train_idx))
        plain = ImageTensorDataset(full_train.images, full_train.labels, augment=False)
        self.val_set = torch.utils.data.Subset(plain, list(val_idx))
        self.test_set = ImageTensorDataset(images("test_images"),
                                           torch.from_numpy(arrays["test_labels"].astype(np.int64)))
        log.info("Fashion-MNIST from %s: %d train / %d val / %d test", root, len(self.train_set), len(self.val_set),
                 len(self.test_set))

    def _loader(self, dataset, shuffle: bool, batch_size: int) -> ResumableDataLoader:
        return make_loader(dataset, batch_size, train=shuffle, num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> ResumableDataLoader:
        return self._loader(self.train_set, True, self.hparams.batch_size)

    def val_dataloader(self) -> ResumableDataLoader:
        return self._loader(self.val_set, False, self.hparams.eval_batch_size)

    def test_dataloader(self) -> ResumableDataLoader:
        return self._loader(self.test_set, False, self.hparams.eval_batch_size)
