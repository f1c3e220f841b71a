"""monarch and blockdiag options: every bad value fails when the config is built and names its option; every
option changes the layer it builds; budgets and counts a layer cannot take fail with the fix."""
import pytest
import torch

from structured_compress.layers.blockdiag import BlockDiagConfig, BlockDiagLinear
from structured_compress.layers.config import OptionError
from structured_compress.layers.monarch import MonarchConfig, MonarchLinear

from .option_checks import assert_option_acts, assert_rejected, covered

WEIGHT = torch.randn(24, 32, generator=torch.Generator().manual_seed(0))

MONARCH_BAD = {  # per option: a value of the wrong type, then every kind of out-of-range value
    "budget": ["half", 0, 1.5],
    "nblocks": [2.5, 0, -2],
}
MONARCH_ACTS = {  # per option: (other settings it needs to act, its changed value)
    "budget": ({}, 0.25),
    "nblocks": ({}, 2),
}
BLOCKDIAG_BAD = {
    "budget": ["half", 0, 1.5],
    "residual_fraction": ["0.2", -0.1, 1.0],
    "refine_steps": [2.5, -3],
    "nblocks": [2.5, 0, -2],
    "residual_rank": [1.5, -1],
}
BLOCKDIAG_ACTS = {
    "budget": ({}, 0.25),
    "residual_fraction": ({}, 0.4),
    "refine_steps": ({"residual_fraction": 0.4}, 0),
    "nblocks": ({}, 8),
    "residual_rank": ({}, 2),
}


def test_tables_cover_every_option():
    covered(MonarchConfig, MONARCH_BAD)
    covered(MonarchConfig, MONARCH_ACTS)
    covered(BlockDiagConfig, BLOCKDIAG_BAD)
    covered(BlockDiagConfig, BLOCKDIAG_ACTS)


@pytest.mark.parametrize("config_class,option,value", [
    *[(MonarchConfig, o, v) for o, values in MONARCH_BAD.items() for v in values],
    *[(BlockDiagConfig, o, v) for o, values in BLOCKDIAG_BAD.items() for v in values],
    (BlockDiagConfig, "budget_of", "macs"),
])
def test_bad_value_names_its_option(config_class, option, value):
    assert_rejected(config_class, option, value)


def test_blockdiag_residual_rank_and_fraction_are_exclusive():
    assert_rejected(BlockDiagConfig, "residual_rank", 2, residual_fraction=0.3)


@pytest.mark.parametrize("cls,table", [(MonarchLinear, MONARCH_ACTS), (BlockDiagLinear, BLOCKDIAG_ACTS)])
def test_every_option_acts(cls, table):
    for option, (others, value) in table.items():
        assert_option_acts(cls, WEIGHT, others, {option: value})


@pytest.mark.parametrize("cls,budget,match", [
    (MonarchLinear, 0.05, r"^budget=0.05: is below the cheapest Monarch layout of a 24x32 layer \(72 numbers\); "
                          r"raise layer.budget to at least 0.0938"),
    (BlockDiagLinear, 0.02, r"^budget=0.02: is below the cheapest block layout of a 24x32 layer \(\d+ numbers\); "
                            r"raise layer.budget to at least"),
])
def test_budget_below_the_smallest_structure_names_the_fix(cls, budget, match):
    with pytest.raises(OptionError, match=match):
        cls.from_dense(WEIGHT, None, cls.Config(budget=budget))


@pytest.mark.parametrize("config,option", [
    (MonarchConfig(nblocks=25), "nblocks"), (BlockDiagConfig(nblocks=25), "nblocks"),
    (BlockDiagConfig(residual_rank=25), "residual_rank"),
    (BlockDiagConfig(budget=0.1, residual_fraction=0.05), "residual_fraction"),  # under one rank-1 component
])
def test_counts_the_layer_cannot_take_name_their_option(config, option):
    cls = MonarchLinear if isinstance(config, MonarchConfig) else BlockDiagLinear
    with pytest.raises(OptionError, match=rf"^{option}="):
        cls.from_dense(WEIGHT, None, config)
