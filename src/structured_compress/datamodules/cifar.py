"""CIFAR-10 / CIFAR-100 (50k train / 10k test, 32x32 RGB) read from torchvision's python-pickle folders;
downloaded with torchvision only when missing and the network is up."""
from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..sources import network_available
from .common import DatasetNotFoundError, check_val_size
from .image_classification import ImageClassificationDataModule

log = logging.getLogger(__name__)

VARIANTS = {  # folder, train files, test files, label key, classes
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100),
}
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def read_batches(folder: Path, names: list[str], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """``uint8 [N, 32, 32, 3]`` images and int64 labels from pickled batches (``data`` rows are CHW-flat)."""
    images, labels = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[label_key.encode()], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


class ArrayImageDataset(Dataset):
    """Images held as one uint8 array, converted to PIL for torchvision/timm transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def cifar_transforms(img_size: int, training: bool, rand_augment: str | None):
    """Random crop (pad 4) + flip (+ RandAugment) at 32 px, or a resize when ``img_size`` differs."""
    from torchvision import transforms as T

    steps = [T.Resize(img_size, interpolation=T.InterpolationMode.BICUBIC)] if img_size != 32 else []
    if training:
        steps += [T.RandomCrop(img_size, padding=4 * img_size // 32), T.RandomHorizontalFlip()]
        if rand_augment:
            from timm.data.auto_augment import rand_augment_transform

            steps.append(rand_augment_transform(rand_augment, {"translate_const": int(img_size * 0.45),
                                                               "img_mean": tuple(round(255 * m) for m in MEAN)}))
    return T.Compose(steps + [T.ToTensor(), T.Normalize(MEAN, STD)])


class CIFARDataModule(ImageClassificationDataModule):
    """``name``: cifar10 | cifar100. Looks in ``data_dir/<name>/<folder>`` and ``data_dir/<folder>``; the last
    ``val_size`` training images (seeded permutation) are held out for validation; test is the test set."""

    def __init__(self, name: str = "cifar10", data_dir: str = "data/", val_size: int = 5000, seed: int = 0,
                 img_size: int = 32, rand_augment: str | None = None, allow_download: bool = True, **kwargs):
        if name not in VARIANTS:
            raise ValueError(f"unknown CIFAR variant {name!r}; use cifar10 or cifar100")
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.num_classes = VARIANTS[name][4]

    def candidate_dirs(self) -> list[Path]:
        base, folder = Path(self.hparams.data_dir), VARIANTS[self.hparams.name][0]
        return [base / self.hparams.name / folder, base / folder]

    def locate(self) -> Path:
        folder, train, test, _, _ = VARIANTS[self.hparams.name]
        found = next((d for d in self.candidate_dirs() if all((d / n).exists() for n in train + test)), None)
        if found is None and self.hparams.allow_download and network_available():
            from torchvision.datasets import CIFAR10, CIFAR100

            cls = CIFAR10 if self.hparams.name == "cifar10" else CIFAR100
            cls(str(Path(self.hparams.data_dir) / self.hparams.name), download=True)
            return self.locate()
        if found is None:
            raise DatasetNotFoundError(
                f"{self.hparams.name} not found. Looked in: {', '.join(map(str, self.candidate_dirs()))}. Run once "
                f"with internet (it downloads into {self.candidate_dirs()[0].parent}) or copy the extracted "
                f"'{folder}' folder of the python version there.")
        return found

    def prepare_data(self) -> None:
        self.locate()

    def build(self) -> None:
        root = self.locate()
        _, train_files, test_files, label_key, _ = VARIANTS[self.hparams.name]
        images, labels = read_batches(root, train_files, label_key)
        check_val_size(self.hparams.val_size, len(labels), self.hparams.name)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.hparams.seed)).numpy()
        val_idx, train_idx = np.sort(order[: self.hparams.val_size]), np.sort(order[self.hparams.val_size:])
        hp = self.hparams
        train_tf = cifar_transforms(hp.img_size, True, hp.rand_augment)
        eval_tf = cifar_transforms(hp.img_size, False, None)
        self.train_set = ArrayImageDataset(images[train_idx], labels[train_idx], train_tf)
        self.val_set = ArrayImageDataset(images[val_idx], labels[val_idx], eval_tf)
        self.test_set = ArrayImageDataset(*read_batches(root, test_files, label_key), eval_tf)
