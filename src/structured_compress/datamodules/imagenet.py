"""ImageNet-1k (or any ImageFolder-layout dataset) with timm transforms; ``imagenet_hf`` reads a Hugging Face
copy (``save_to_disk`` folder or a local folder of parquet files). ImageNet cannot be downloaded
automatically (its licence needs a login), so a missing copy is an immediate, explicit error."""
from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from .common import DatasetNotFoundError, imagenet_folder_dirs, missing_imagenet_folder
from .hf_local import load_local_dataset
from .image_classification import IMAGENET_MEAN, IMAGENET_STD, ImageClassificationDataModule, build_transforms


class _TransformOptions:
    """The transform knobs shared by both ImageNet readers."""

    def _transforms(self):
        hp = self.hparams
        mean, std = tuple(hp.mean), tuple(hp.std)
        train = build_transforms(hp.img_size, True, hp.rand_augment, hp.re_prob, hp.crop_pct, hp.interpolation,
                                 mean, std)
        evaluate = build_transforms(hp.img_size, False, crop_pct=hp.crop_pct, interpolation=hp.interpolation,
                                    mean=mean, std=std)
        return train, evaluate

    def _check_classes(self, found: int) -> None:
        if found != self.num_classes:
            raise ValueError(f"the data has {found} classes but datamodule.num_classes={self.num_classes}; "
                             "set num_classes (and model.num_classes) to match")


class ImageNetDataModule(_TransformOptions, ImageClassificationDataModule):
    """``<root>/train/<class>/*.JPEG`` and ``<root>/val/<class>/*.JPEG``; ``val`` serves validation and test.

    Looks in ``path``, ``data_dir/imagenet``, ``data_dir/ILSVRC2012``. Prepare ``val`` in class folders
    (e.g. with the usual ``valprep.sh``).
    """

    def __init__(self, data_dir: str = "data/", path: str | None = None, num_classes: int = 1000,
                 img_size: int = 224, rand_augment: str | None = "rand-m9-mstd0.5-inc1", re_prob: float = 0.25,
                 crop_pct: float = 0.875, interpolation: str = "bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 **kwargs):
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.num_classes = num_classes

    def candidate_dirs(self) -> list[Path]:
        return imagenet_folder_dirs(self.hparams.data_dir, self.hparams.path)

    def locate(self) -> Path:
        missing = missing_imagenet_folder(self.hparams.data_dir, self.hparams.path)
        if missing:
            raise DatasetNotFoundError(missing)
        return next(d for d in self.candidate_dirs() if (d / "train").is_dir() and (d / "val").is_dir())

    def prepare_data(self) -> None:
        self.locate()

    def build(self) -> None:
        from torchvision.datasets import ImageFolder

        root = self.locate()
        train_tf, eval_tf = self._transforms()
        self.train_set = ImageFolder(str(root / "train"), transform=train_tf)
        self._check_classes(len(self.train_set.classes))
        self.val_set = self.test_set = ImageFolder(str(root / "val"), transform=eval_tf)


class HFImageDataset(Dataset):
    """A HF dataset split with ``image`` (PIL) and ``label`` columns, transformed on access."""

    def __init__(self, split, transform, image_key: str = "image", label_key: str = "label"):
        self.split, self.transform, self.image_key, self.label_key = split, transform, image_key, label_key

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        row = self.split[index]
        return self.transform(row[self.image_key].convert("RGB")), int(row[self.label_key])


class ImageNetHFDataModule(_TransformOptions, ImageClassificationDataModule):
    """ImageNet as a Hugging Face dataset (``ILSVRC/imagenet-1k``: train / validation splits) from ``path``,
    ``data_dir/imagenet_hf`` or the datasets cache; ``validation`` serves validation and test."""

    hub_name = "ILSVRC/imagenet-1k"

    def __init__(self, data_dir: str = "data/", path: str | None = None, num_classes: int = 1000,
                 img_size: int = 224, rand_augment: str | None = "rand-m9-mstd0.5-inc1", re_prob: float = 0.25,
                 crop_pct: float = 0.875, interpolation: str = "bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 allow_download: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.num_classes = num_classes

    def load(self):
        base = Path(self.hparams.data_dir)
        return load_local_dataset([self.hparams.path, base / "imagenet_hf"], self.hub_name,
                                  allow_download=self.hparams.allow_download,
                                  how_to="The hub copy is gated: log in and accept its terms first.")

    def prepare_data(self) -> None:
        self.load()

    def build(self) -> None:
        data = self.load()
        train_tf, eval_tf = self._transforms()
        self._check_classes(data["train"].features["label"].num_classes)
        self.train_set = HFImageDataset(data["train"], train_tf)
        self.val_set = self.test_set = HFImageDataset(data["validation"], eval_tf)
