"""Shared base for image classification datasets: timm transforms, optional mixup / cutmix in the collate."""
from __future__ import annotations

import logging

import lightning.pytorch as pl
import torch
from torch.utils.data import default_collate

from .loaders import ResumableDataLoader, make_loader

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_transforms(img_size: int, training: bool, rand_augment: str | None = None, re_prob: float = 0.0,
                     crop_pct: float = 0.875, interpolation: str = "bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     scale: tuple[float, float] = (0.08, 1.0)):
    """timm's train (random-resized crop, flip, RandAugment such as ``"rand-m9-mstd0.5-inc1"``, random erasing)
    or eval (resize + centre crop by ``crop_pct``) transform."""
    from timm.data import create_transform

    if training:
        transform = create_transform(img_size, is_training=True, auto_augment=rand_augment, re_prob=re_prob,
                                     interpolation=interpolation, mean=mean, std=std, scale=scale)
        return keep_one_posterize_bit(transform)
    return create_transform(img_size, is_training=False, crop_pct=crop_pct, interpolation=interpolation,
                            mean=mean, std=std)


def _posterize_bits_at_least_one(level_fn):
    return lambda magnitude, hparams: (max(1, level_fn(magnitude, hparams)[0]),)


def keep_one_posterize_bit(transform):
    """timm's increasing posterize maps magnitude 10 (reached by ``mstd`` sampling, ~2 % of draws at m9 mstd0.5)
    to 0 bits, which Pillow 13 (the pinned stack's) rejects ("bits must be between 1 and 8") and which would
    black the image out; clamp it to 1 bit so a long run cannot die on one unlucky draw."""
    from timm.data.auto_augment import RandAugment

    for step in getattr(transform, "transforms", []):
        if isinstance(step, RandAugment):
            for op in step.ops:
                if op.name == "PosterizeIncreasing" and op.level_fn is not None:
                    op.level_fn = _posterize_bits_at_least_one(op.level_fn)
    return transform


class MixupCollate:
    """Collate, then apply timm ``Mixup`` (mixup and/or cutmix, label smoothing): targets become soft
    ``[B, num_classes]`` probabilities, which ``F.cross_entropy`` accepts. Needs an even batch size."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 label_smoothing: float = 0.1, prob: float = 1.0, switch_prob: float = 0.5):
        from timm.data import Mixup

        self.mixup = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob,
                           label_smoothing=label_smoothing, num_classes=num_classes)

    def __call__(self, samples):
        images, labels = default_collate(samples)
        return self.mixup(images, labels)


class ImageClassificationDataModule(pl.LightningDataModule):
    """Subclasses set ``self.train_set``, ``self.val_set``, ``self.test_set`` (``(image, label)`` datasets) in
    :meth:`build`; ``mixup`` is a dict of :class:`MixupCollate` options or None."""

    num_classes: int

    def __init__(self, batch_size: int = 128, eval_batch_size: int = 256, num_workers: int = 4,
                 mixup: dict | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.train_set = self.val_set = self.test_set = None

    def build(self) -> None:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.build()
            log.info("%s: %d train / %d val / %d test images, %d classes", type(self).__name__,
                     len(self.train_set), len(self.val_set), len(self.test_set), self.num_classes)

    def _loader(self, dataset, shuffle: bool, batch_size: int, collate=None,
                drop_last: bool = False) -> ResumableDataLoader:
        return make_loader(dataset, batch_size, train=shuffle, num_workers=self.hparams.num_workers,
                           collate_fn=collate, drop_last=drop_last, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> ResumableDataLoader:
        mixup = self.hparams.mixup
        collate = MixupCollate(self.num_classes, **mixup) if mixup else None
        return self._loader(self.train_set, True, self.hparams.batch_size, collate, drop_last=bool(mixup))

    def val_dataloader(self) -> ResumableDataLoader:
        return self._loader(self.val_set, False, self.hparams.eval_batch_size)

    def test_dataloader(self) -> ResumableDataLoader:
        return self._loader(self.test_set, False, self.hparams.eval_batch_size)
