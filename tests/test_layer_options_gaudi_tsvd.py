"""Every gaudi and tsvd option acts: changing it from its default changes the built layer, and an option that
would change nothing with the other settings is an error, not a silent no-op."""
from __future__ import annotations

import copy
import dataclasses
import re

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from structured_compress.layer_checks import check_layer
from structured_compress.layers.config import OptionError
from structured_compress.layers.gaudi import GaudiConfig, GaudiGBLRLinear
from structured_compress.layers.gaudi.config import STARTS, USED_BY_STARTS
from structured_compress.layers.tsvd import TernarySVDConfig, TernarySVDLinear, requantize_
from structured_compress.surgery import compress_

from .conftest import CONFIG_DIR, compose_config, experiment_names

GAUDI_FAST = {"sweeps": 1}  # keeps the default blocks start cheap
GIVEN = {"starts": ["given"], "niter": 2}
GREEDY = {"starts": ["greedy"], "niter": 0}
SHARP_GREEDY = {**GREEDY, "filter_std": 0.5}  # profiles smoothed less than the 16 columns, so thresholds cut
# option -> (the settings it needs to act, a valid non-default value)
GAUDI_CASES = {
    "budget": (GAUDI_FAST, 0.5),
    "starts": ({}, ["lowrank"]),
    "sweeps": ({}, 1),
    "niter": ({"starts": ["given"]}, 2),
    "weight_lr": (GIVEN, 0.2),
    "structure_lr_base": (GIVEN, 100.0),
    "row_thresholds": (SHARP_GREEDY, [0.5]),
    "col_thresholds": (SHARP_GREEDY, [0.5]),
    "filter_std": (GREEDY, 0.5),
    "location_init": ({**GIVEN, "niter": 0}, 0.5),
    "num_components": (GAUDI_FAST, 2),
    "drop_empty": (GAUDI_FAST, False),
    "sigma": (GAUDI_FAST, 1.0),
    "compute_mode": (GAUDI_FAST, "lr"),
    "custom_grad": (GAUDI_FAST, True),
    "no_ste": (GAUDI_FAST, True),
    "segments": ({**GAUDI_FAST, "budget": 0.5}, "kernel"),  # 12x4 blocks: 0.25 would hold no full component
}
TSVD_CASES = {
    "budget": ({"budget_cap": True}, 0.05),
    "tolerance": ({}, 0.2),
    "cos_thresh": ({}, 0.95),
    "steps": ({}, 5),
    "refit_every": ({}, 3),
    "max_rank": ({}, 3),
    "budget_cap": ({"budget": 0.05}, True),
    "prune_rate": ({}, 0.5),
}
SINGLE_CHOICE = {"budget_of"}  # a Literal with one value: nothing to change it to


def weight(seed: int = 0) -> torch.Tensor:
    """12x16: a rank-1 term, one rank-1 term per 6x8 tile (the structure the blocks start looks for), noise."""
    gen = torch.Generator().manual_seed(seed)
    matrix = torch.outer(torch.randn(12, generator=gen), torch.randn(16, generator=gen))
    for rows in (slice(0, 6), slice(6, 12)):
        for cols in (slice(0, 8), slice(8, 16)):
            matrix[rows, cols] += torch.outer(torch.randn(6, generator=gen), torch.randn(8, generator=gen))
    return matrix + 0.1 * torch.randn(12, 16, generator=gen)


def gaudi_signature(config: GaudiConfig) -> list:
    """What a built layer is: eval weight, structure, MACs, bytes, rebuild options, and a training forward after
    moving the widths off the 1/N grid (where the straight-through snapping acts)."""
    torch.manual_seed(0)
    layer = GaudiGBLRLinear.from_dense(weight(), torch.zeros(12), config, kernel_positions=4).eval()
    seen = [layer.to_dense_weight(), layer.widths, layer.locations, layer.macs_per_token(), layer.storage_bytes(),
            layer.config()]
    layer.train()
    with torch.no_grad():
        layer.widths.add_(0.4 / 16)
    return seen + [layer.to_dense_weight()]


def tsvd_signature(config: TernarySVDConfig) -> list:
    """Eval weight, rank, MACs, bytes, rebuild options, and a QAT re-ternarization of a nudged weight."""
    layer = TernarySVDLinear.from_dense(weight(), None, config)
    seen = [layer.to_dense_weight(), layer.rank, layer.macs_per_token(), layer.storage_bytes(), layer.config()]
    requantize_(layer, weight() + 0.3 * weight(1))
    return seen + [layer.to_dense_weight()]


def same(a: list, b: list) -> bool:
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


@pytest.mark.parametrize("config_class,cases", [(GaudiConfig, GAUDI_CASES), (TernarySVDConfig, TSVD_CASES)],
                         ids=["gaudi", "tsvd"])
def test_the_tables_cover_every_option(config_class, cases):
    assert set(cases) | SINGLE_CHOICE == {f.name for f in dataclasses.fields(config_class)}
    for name, (context, value) in cases.items():
        assert value != getattr(config_class(**context), name), name


@pytest.mark.parametrize("name", sorted(GAUDI_CASES))
def test_every_gaudi_option_acts(name):
    context, value = GAUDI_CASES[name]
    assert not same(gaudi_signature(GaudiConfig(**context)), gaudi_signature(GaudiConfig(**context, **{name: value})))


@pytest.mark.parametrize("name", sorted(TSVD_CASES))
def test_every_tsvd_option_acts(name):
    context, value = TSVD_CASES[name]
    default, changed = TernarySVDConfig(**context), TernarySVDConfig(**context, **{name: value})
    assert not same(tsvd_signature(default), tsvd_signature(changed))


@pytest.mark.parametrize("name", sorted(USED_BY_STARTS))
def test_a_gaudi_option_without_the_start_that_reads_it_is_an_error(name):
    value, users = GAUDI_CASES[name][1], USED_BY_STARTS[name]
    other = next(kind for kind in STARTS if kind not in users)
    with pytest.raises(OptionError, match=rf"^{name}=.*: it acts on the .* only and starts=\[{other}\] has none; "
                                          rf"add \w+ to starts, or remove {name}"):
        GaudiConfig(starts=[other], **{name: value})
    GaudiConfig(starts=list(users), **{name: value})  # with them it is fine


def test_other_gaudi_and_tsvd_knobs_that_would_change_nothing():
    with pytest.raises(OptionError, match="weight_lr=0.2: niter=0 runs no refinement step"):
        GaudiConfig(starts=["given"], niter=0, weight_lr=0.2)
    with pytest.raises(OptionError, match="compute_mode=compact: .*sigma=1.0 blurs them"):
        GaudiConfig(compute_mode="compact", sigma=1.0)
    with pytest.raises(OptionError, match=r"starts=\[blocks,given,blocks\]: names a start kind twice"):
        GaudiConfig(starts=["blocks", "given", "blocks"])
    with pytest.raises(OptionError, match="budget_cap=True: max_rank=3 already caps the rank"):
        TernarySVDConfig(budget_cap=True, max_rank=3)


def test_a_budget_below_the_smallest_structure_is_an_error():
    with pytest.raises(OptionError, match=r"budget=0.02: keeps less than one 2x2 component \(4 MACs\) of a 12x16 "
                                          r"block; raise layer.budget to at least 0.021"):
        GaudiGBLRLinear.from_dense(weight(), None, GaudiConfig(budget=0.02))
    with pytest.raises(OptionError, match=r"budget=0.005: with budget_cap, keeps less than one ternary component"):
        TernarySVDLinear.from_dense(weight(), None, TernarySVDConfig(budget=0.005, budget_cap=True))
    with pytest.raises(OptionError, match=r"segments=5: 5 blocks do not divide the 16 input features"):
        GaudiGBLRLinear.from_dense(weight(), None, GaudiConfig(segments=5))


def test_compress_by_name_and_options_equals_config_objects():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
    for name, options, config in [
            ("gaudi", {"sweeps": 2, "num_components": 4}, GaudiConfig(budget=0.4, sweeps=2, num_components=4)),
            ("tsvd", {"tolerance": 0.2}, TernarySVDConfig(budget=0.4, tolerance=0.2))]:
        by_name, by_config = copy.deepcopy(dense), copy.deepcopy(dense)
        report = compress_(by_name, name, 0.4, options=options)
        compress_(by_config, config)
        assert same([by_name[0].to_dense_weight()], [by_config[0].to_dense_weight()])
        assert report.layers[0].budget_of == config.budget_of and report.layers[0].options == config.options()


def gaudi_and_tsvd_experiments() -> list[str]:
    """Experiments whose layer group is gaudi or tsvd (``override /layer: <type>``)."""
    return [name for name in experiment_names()
            if re.search(r"/layer: (gaudi|tsvd)\b", (CONFIG_DIR / "experiment" / f"{name}.yaml").read_text())]


@pytest.mark.parametrize("experiment", gaudi_and_tsvd_experiments())
def test_gaudi_and_tsvd_experiments_set_only_options_that_act(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}"], tmp_path)
    check_layer(OmegaConf.to_container(cfg.layer, resolve=True))
