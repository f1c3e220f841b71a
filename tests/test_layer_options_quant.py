"""svdq and hyper options: every bad value fails when the config is built and names its option; every option
changes the layer it builds; budgets and ranks a layer cannot take fail with the fix."""
import pytest
import torch

from structured_compress.layers.config import OptionError
from structured_compress.layers.hyper import HyperCompressedLinear, HyperConfig
from structured_compress.layers.svdq import SVDQuantConfig, SVDQuantLinear

from .option_checks import assert_option_acts, assert_rejected, covered

GEN = torch.Generator().manual_seed(0)
WEIGHT = torch.randn(24, 32, generator=GEN) / 32 ** 0.5
INPUTS = torch.randn(96, 32, generator=GEN) @ torch.randn(32, 32, generator=GEN)  # correlated: GPTQ differs
CALIBRATION = {"inputs": INPUTS, "gram": INPUTS.double().T @ INPUTS.double()}

SVDQ_BAD = {  # per option: a value of the wrong type, then every kind of out-of-range value
    "budget": ["half", 0, 1.5],
    "bits": ["8", 3, 16],
    "group_size": ["16", 0, -4],
    "max_error": ["small", 0, -0.1],
    "fallback_bits": ["8", 4],
    "symmetric": ["yes", 1],
    "rounding": [1, "stochastic"],
    "svd": ["false", 0],
    "rank": [2.5, 0, -1],
    "grid": [1, "q4_0"],
}
SVDQ_ACTS = {  # per option: (other settings it needs to act, its changed value)
    "budget": ({}, 0.25),
    "bits": ({}, 4),
    "group_size": ({}, 8),
    "max_error": ({}, 0.05),
    "fallback_bits": ({"bits": 4, "max_error": 0.05}, 8),  # int4 misses 5 % even dense: int8 instead of float
    "symmetric": ({}, False),
    "rounding": ({}, "gptq"),
    "svd": ({}, False),
    "rank": ({}, 2),
    "grid": ({"bits": 4, "group_size": 32, "svd": False}, "gguf"),  # Q4_0: the signed extreme maps to -8
}
HYPER_BAD = {
    "rect_l": ["wide", 0, -0.1],
    "rect_l_std": ["4", 0, -1.0],
    "codebook_sizes": [1600, [], [64, 0]],
    "max_classes": [2.0, 0],
    "loss_max": ["5%", 0, -0.05],
}
HYPER_ACTS = {
    "rect_l": ({}, 0.05),
    "rect_l_std": ({}, 2.0),
    "codebook_sizes": ({}, [64]),
    "max_classes": ({}, 1),
    "loss_max": ({}, 1e-4),  # stored raw
}


def test_tables_cover_every_option():
    covered(SVDQuantConfig, SVDQ_BAD)
    covered(SVDQuantConfig, SVDQ_ACTS)
    covered(HyperConfig, HYPER_BAD, unused=("budget",))
    covered(HyperConfig, HYPER_ACTS, unused=("budget",))  # hyper's size follows from its codebook


@pytest.mark.parametrize("option,value", [(o, v) for o, values in SVDQ_BAD.items() for v in values])
def test_svdq_bad_value_names_its_option(option, value):
    assert_rejected(SVDQuantConfig, option, value)


@pytest.mark.parametrize("option,value", [(o, v) for o, values in HYPER_BAD.items() for v in values])
def test_hyper_bad_value_names_its_option(option, value):
    assert_rejected(HyperConfig, option, value)


@pytest.mark.parametrize("option,value,others", [
    ("fallback_bits", 8, {"bits": 4}),  # nothing to fall back from without a bound
    ("fallback_bits", 8, {"bits": 8, "max_error": 0.05}),  # not more bits than bits
    ("rank", 4, {"svd": False}),  # no factors
    ("rank", 4, {"max_error": 0.05}),  # max_error picks the rank
    ("budget_of", "macs", {}),
])
def test_svdq_options_that_cannot_act_together_are_rejected(option, value, others):
    assert_rejected(SVDQuantConfig, option, value, **others)


@pytest.mark.parametrize("option", SVDQ_ACTS)
def test_every_svdq_option_acts(option):
    others, value = SVDQ_ACTS[option]
    assert_option_acts(SVDQuantLinear, WEIGHT, others, {option: value}, **CALIBRATION)


@pytest.mark.parametrize("option", HYPER_ACTS)
def test_every_hyper_option_acts(option):
    others, value = HYPER_ACTS[option]
    assert_option_acts(HyperCompressedLinear, WEIGHT, others, {option: value})


@pytest.mark.parametrize("config,needed", [
    (SVDQuantConfig(), ()), (SVDQuantConfig(max_error=0.1), ("inputs",)),
    (SVDQuantConfig(rounding="gptq"), ("gram",)), (SVDQuantConfig(max_error=0.1, rounding="gptq"), ("inputs", "gram")),
])
def test_svdq_asks_for_the_calibration_it_uses(config, needed):
    assert set(config.calibration_needed()) == set(needed)


def test_svdq_budget_below_one_component_and_rank_beyond_the_layer_name_the_fix():
    with pytest.raises(OptionError, match=r"^budget=0.05: keeps less than one rank-1 component of a 24x32 layer"):
        SVDQuantLinear.from_dense(WEIGHT, None, SVDQuantConfig(budget=0.05))
    with pytest.raises(OptionError, match=r"^rank=25: exceeds min\(out, in\) = 24"):
        SVDQuantLinear.from_dense(WEIGHT, None, SVDQuantConfig(rank=25))
