"""layer=auto: greedy per-layer codec plan under a byte target or a quality floor."""
import itertools

import pytest
import torch
from torch import nn

from structured_compress.planner import KEEP, Option, greedy_plan, lower_hull, output_weights
from structured_compress.layers.svdq import SVDQuantLinear
from structured_compress.modeltree import select_layers
from structured_compress.surgery import collect_input_gram, compress_

# hand-checkable: error added per byte saved -- c: 5e-5 then 1e-4; a: 2e-4 then 1.6e-3; b: 2e-3 then 8e-3
TABLE = {
    "a": [Option(KEEP, 100, 0.0), Option("int8", 50, 0.01), Option("int4", 25, 0.05)],
    "b": [Option(KEEP, 100, 0.0), Option("int8", 50, 0.10), Option("int4", 25, 0.30)],
    "c": [Option(KEEP, 40, 0.0), Option("int8", 20, 0.001), Option("int4", 10, 0.002),
          Option("worse", 30, 0.01)],  # dominated: more bytes and more error than int8
}


def brute_force(target_bytes: int) -> float:
    """The least summed error over every combination that fits ``target_bytes``."""
    combos = itertools.product(*TABLE.values())
    return min(sum(o.error for o in combo) for combo in combos if sum(o.bytes for o in combo) <= target_bytes)


def test_lower_hull_drops_dominated_options():
    assert [o.choice for o in lower_hull(TABLE["c"])] == [KEEP, "int8", "int4"]
    concave = [Option(KEEP, 100, 0.0), Option("mid", 50, 0.09), Option("low", 0, 0.1)]
    assert [o.choice for o in lower_hull(concave)] == [KEEP, "low"]  # "mid" is never worth its error


def test_greedy_plan_by_hand_and_optimal_at_each_stop():
    plan = greedy_plan(TABLE, target_bytes=160)
    assert {name: o.choice for name, o in plan.items()} == {"a": "int8", "b": KEEP, "c": "int4"}
    # the greedy path stops at 220, 210, 160, 135, 85, 60 bytes: at each it matches the exhaustive optimum
    for target in (220, 210, 160, 135, 85, 60):
        chosen = greedy_plan(TABLE, target_bytes=target)
        assert sum(o.bytes for o in chosen.values()) <= target
        assert sum(o.error for o in chosen.values()) == pytest.approx(brute_force(target))


def test_quality_floor_stops_before_the_bound():
    plan = greedy_plan(TABLE, max_error=0.02)  # c to int4 and a to int8 (0.012); a to int4 would reach 0.052
    assert {name: o.choice for name, o in plan.items()} == {"a": "int8", "b": KEEP, "c": "int4"}
    with pytest.raises(ValueError, match="exactly one"):
        greedy_plan(TABLE)


CHOICES = {
    "int8": {"layer": "svdq", "options": {"bits": 8, "svd": False, "rounding": "gptq"}},
    "int4-g32": {"layer": "svdq", "options": {"bits": 4, "group_size": 32, "symmetric": False, "svd": False,
                                              "rounding": "gptq"}},
}


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 32))


@pytest.mark.parametrize("ratio", [1.5, 3.0])
def test_auto_meets_the_byte_target_on_a_tiny_model(ratio):
    model = tiny_model()
    inputs = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    calibration = collect_input_gram(model, [inputs], select_layers(model))
    fp16_bytes = sum(2 * p.numel() for p in model.parameters())
    report = compress_(model, "auto", options={"choices": CHOICES, "target_ratio": ratio}, calibration=calibration)
    kept = [m for m in model if isinstance(m, nn.Linear)]
    planned = sum(m.storage_bytes() for m in model if isinstance(m, SVDQuantLinear))
    planned += sum(2 * p.numel() for m in kept for p in m.parameters())
    assert planned <= fp16_bytes / ratio
    assert all(row.options["auto_choice"] in CHOICES for row in report.layers)
    assert len(report.layers) + len(kept) == 3


def test_auto_needs_calibration_and_choices():
    model = tiny_model()
    with pytest.raises(ValueError, match="calibration_batches"):
        compress_(model, "auto", options={"choices": CHOICES, "target_ratio": 2.0})
    with pytest.raises(ValueError, match="choices"):
        compress_(model, "auto", options={"choices": {}, "target_ratio": 2.0})


class DampedBranch(nn.Module):
    """``loud(x) + 0.01 * quiet(x)``: twin layers whose errors reach the output 10,000x apart (squared)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.loud, self.quiet = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        return self.loud(x) + 0.01 * self.quiet(x)


def test_output_weights_measure_each_layers_end_to_end_gain():
    model = DampedBranch()
    inputs = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    calibration = collect_input_gram(model, [inputs], select_layers(model))
    weights = output_weights(model, calibration, CHOICES["int4-g32"], [inputs], forward=lambda m, x: m(x))
    assert isinstance(model.quiet, nn.Linear) and isinstance(model.loud, nn.Linear)  # restored after probing
    reference = model(inputs)
    for name, factor in (("loud", 1.0), ("quiet", 0.01)):  # the branch's share of the output, squared
        share = (factor * getattr(model, name)(inputs)).square().sum() / reference.square().sum()
        assert weights[name] == pytest.approx(share.item(), rel=1e-4)


def test_output_weights_move_the_bits_to_the_layer_the_output_needs():
    model = DampedBranch()
    inputs = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    calibration = collect_input_gram(model, [inputs], select_layers(model))
    weights = output_weights(model, calibration, CHOICES["int4-g32"], [inputs], forward=lambda m, x: m(x))
    # room for one fp16 layer and one int4 layer: the damped one must be the int4 one
    compress_(model, "auto", options={"choices": CHOICES, "target_ratio": 1.5, "weights": weights},
              calibration=calibration)
    assert isinstance(model.loud, nn.Linear) and model.quiet.bits == 4


def planned_bytes(options: dict) -> tuple[dict, int]:
    """The plan ``layer=auto`` with ``options`` makes on the tiny model: layer -> choice, and its bytes."""
    model = tiny_model()
    inputs = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    report = compress_(model, "auto", options=options, calibration=collect_input_gram(model, [inputs],
                                                                                          select_layers(model)))
    return ({row.name: row.options["auto_choice"] for row in report.layers},
            sum(row.options["auto_bytes"] for row in report.layers))


@pytest.mark.parametrize("option,value", [("target_ratio", 3.5), ("target_bytes", 9000), ("max_error", 1e-2),
                                          ("choices", {"int8": CHOICES["int8"]}),
                                          ("weights", {"0": 1e6, "2": 1e6, "4": 1e-6})])
def test_every_auto_option_acts(option, value):
    base = {"choices": CHOICES, "target_ratio": 2.0, "target_bytes": None, "max_error": None}  # int8, int4, int8
    changed = {**base, option: value}
    if option in ("target_bytes", "max_error"):
        changed["target_ratio"] = None
    assert planned_bytes(base) != planned_bytes(changed)
