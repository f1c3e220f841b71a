"""Loaders: deterministic (seed, epoch) order, DDP shards (equal for training, disjoint and complete for
evaluation), and a mid-epoch resume that continues with exactly the batches not yet seen."""
import pytest
import torch
from torch.utils.data import TensorDataset

from structured_compress.datamodules import loaders
from structured_compress.datamodules.loaders import make_loader

DATA = TensorDataset(torch.arange(23))


def indices(loader):
    return [int(i) for batch in loader for i in batch[0]]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_shards_cover_every_sample_once(world, monkeypatch):
    seen = []
    for rank in range(world):
        monkeypatch.setattr(loaders, "_rank_and_world", lambda r=rank: (r, world))
        seen += indices(make_loader(DATA, 4, train=False))
    assert sorted(seen) == list(range(23))


def test_train_shards_are_equal_and_disjoint_up_to_padding(monkeypatch):
    shards = []
    for rank in range(2):
        monkeypatch.setattr(loaders, "_rank_and_world", lambda r=rank: (r, 2))
        shards.append(indices(make_loader(DATA, 4, train=True, seed=3)))
    assert len(shards[0]) == len(shards[1]) == 12
    assert set(shards[0]) | set(shards[1]) == set(range(23))


def test_order_depends_on_seed_and_epoch_only():
    first, again = make_loader(DATA, 5, train=True, seed=7), make_loader(DATA, 5, train=True, seed=7)
    torch.manual_seed(123)  # the global RNG plays no part
    assert indices(first) == indices(again)
    first.sampler.set_epoch(1)
    assert indices(first) != indices(again)


def test_resume_mid_epoch_yields_the_remaining_batches():
    loader = make_loader(DATA, 4, train=True, seed=1)
    loader.sampler.set_epoch(2)
    full = [batch[0].tolist() for batch in loader]
    iterator = iter(loader)
    next(iterator), next(iterator)
    state = loader.state_dict()
    resumed = make_loader(DATA, 4, train=True, seed=1)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)
    assert [batch[0].tolist() for batch in resumed] == full[2:]
    assert [batch[0].tolist() for batch in resumed] == full  # the skip applies once


@pytest.mark.parametrize("num_workers", [0, 2])
def test_position_is_cumulative_across_resumes(num_workers):
    """Consume k batches, resume, consume j more: the state says k + j, and each resume continues where the last
    stopped (a second preemption in the same epoch replays nothing and skips nothing)."""
    loader = make_loader(DATA, 2, train=True, seed=5, num_workers=num_workers)
    loader.sampler.set_epoch(1)
    full = [batch[0].tolist() for batch in loader]
    seen, state = [], None
    for take in (2, 3, 4):
        resumed = make_loader(DATA, 2, train=True, seed=5, num_workers=num_workers)
        if state:
            resumed.load_state_dict(state)
        resumed.sampler.set_epoch(1)
        iterator = iter(resumed)
        seen += [next(iterator)[0].tolist() for _ in range(take)]
        state = resumed.state_dict()
        del iterator
    assert state == {"epoch": 1, "batches": 9}
    assert seen == full[:9]


def test_position_restarts_with_a_new_epoch_and_ignores_a_state_of_another_epoch():
    loader = make_loader(DATA, 2, train=True, seed=5)
    loader.load_state_dict({"epoch": 1, "batches": 3})
    assert loader.state_dict() == {"epoch": 1, "batches": 3}  # restored, not yet iterated
    loader.sampler.set_epoch(1)
    assert len(list(loader)) == 12 - 3 and loader.state_dict() == {"epoch": 1, "batches": 12}
    loader.sampler.set_epoch(2)
    iterator = iter(loader)
    next(iterator)
    assert loader.state_dict() == {"epoch": 2, "batches": 1}
    stale = make_loader(DATA, 2, train=True, seed=5)
    stale.load_state_dict({"epoch": 1, "batches": 12})  # saved at the end of epoch 1: epoch 2 starts whole
    stale.sampler.set_epoch(2)
    assert len(list(stale)) == 12
