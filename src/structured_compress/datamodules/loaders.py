"""Data loaders that resume mid-epoch and shard for DDP the same way on every machine.

Every datamodule builds its loaders with :func:`make_loader`:

- training order is a permutation drawn from ``(seed, epoch)`` alone, so a resumed run sees the same batches as
  an uninterrupted one; the loader's ``state_dict`` (saved in Lightning checkpoints) records how many batches
  of the current epoch were consumed, counted from the epoch's start across any number of resumes, and a
  restored loader skips exactly those;
- under DDP each rank takes an equal share of the training permutation (padded by wrapping, as
  ``DistributedSampler`` does, so every rank runs the same number of steps) and a disjoint, unpadded share
  of evaluation data, so every validation/test sample is counted exactly once.

The samplers subclass ``DistributedSampler``, so Lightning keeps them instead of injecting its own.
"""
from __future__ import annotations

import math
import os
from typing import Any, Iterator

import logging

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

log = logging.getLogger(__name__)


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EpochSampler(DistributedSampler):
    """This rank's indices for one epoch: a ``(seed, epoch)`` permutation when ``shuffle`` (training), the
    dataset order otherwise; ``skip_once`` drops leading indices once, for a mid-epoch resume."""

    def __init__(self, dataset: Dataset, shuffle: bool, seed: int = 0, pad_to_equal: bool = True):
        rank, world = _rank_and_world()
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.pad_to_equal = pad_to_equal
        size = len(dataset)
        self.num_samples = math.ceil(size / world) if pad_to_equal else len(range(rank, size, world))
        self.total_size = self.num_samples * world if pad_to_equal else size
        self._skip = 0

    def skip_once(self, samples: int) -> None:
        """Drop the first ``samples`` indices the next time the sampler is iterated."""
        self._skip = samples

    def __iter__(self) -> Iterator[int]:
        size = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(size, generator=generator).tolist()
        else:
            order = list(range(size))
        if self.pad_to_equal and self.total_size > size:
            order += (order * math.ceil(self.total_size / size))[: self.total_size - size]
        mine = order[self.rank:self.total_size:self.num_replicas]
        mine, self._skip = mine[self._skip:], 0
        return iter(mine)

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position within the epoch is part of Lightning's checkpoint.

    The position counts the batches handed to the trainer since the epoch started, including those a resumed
    run skipped, so a checkpoint written after a resume is as exact as the first one. Batches that worker
    processes fetched ahead are not counted: only those this iterator yielded. (Lightning's fetcher draws one
    batch per step from a loader of known length, so yielded batches are the batches trained on.)
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._consumed = 0
        self._restored: dict[str, int] | None = None

    def __iter__(self):
        # a generator: this runs at the first batch, after Lightning has set the sampler's epoch
        self._consumed = self._skip_restored_batches()
        for batch in super().__iter__():
            self._consumed += 1
            yield batch

    def _skip_restored_batches(self) -> int:
        """The batches of this epoch a restored state says were consumed (0 unless this epoch is the one it was
        saved in); the sampler skips their samples. A restored state applies to the first iteration only."""
        restored, self._restored = self._restored, None
        if restored is None or restored["epoch"] != self.sampler.epoch:
            return 0
        self.sampler.skip_once(restored["batches"] * int(self.batch_size))
        log.info("data loader resumes epoch %d after %d batches", restored["epoch"], restored["batches"])
        return restored["batches"]

    def state_dict(self) -> dict[str, Any]:
        if self._restored is not None:  # restored, not iterated yet: the position is still the restored one
            return dict(self._restored)
        return {"epoch": self.sampler.epoch, "batches": self._consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(self.sampler, EpochSampler):
            raise ValueError("only loaders built by make_loader can resume mid-epoch")
        self._restored = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}


def make_loader(dataset: Dataset, batch_size: int, train: bool, seed: int | None = None, num_workers: int = 0,
                **kwargs) -> ResumableDataLoader:
    """The loader every datamodule returns: shuffled, padded shards for training; ordered, disjoint shards
    for evaluation. ``seed`` defaults to the run's (``seed_everything`` exports it as ``PL_GLOBAL_SEED``);
    ``kwargs`` go to ``DataLoader`` (collate_fn, drop_last, pin_memory, ...)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else seed
    sampler = EpochSampler(dataset, shuffle=train, seed=seed, pad_to_equal=train)
    # its own generator: creating an iterator would otherwise draw from the global RNG, so a resumed run (one
    # iterator more) would see other dropout masks than an uninterrupted one
    generator = torch.Generator().manual_seed(seed)
    return ResumableDataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                               persistent_workers=num_workers > 0, generator=generator, **kwargs)
