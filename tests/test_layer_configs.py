"""Typed layer configs: every option is declared once (type, default, doc, range), its YAML is generated from
it, and every wrong value fails at compose time with one line naming the key."""
from __future__ import annotations

import copy
import dataclasses
import types
import typing

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from structured_compress import surgery  # noqa: F401  (registers every type and the planner's auto)
from structured_compress.errors import ConfigError
from structured_compress.layer_checks import check_layer
from structured_compress.layers import LAYERS
from structured_compress.layers.config import CONFIGS, LayerConfig, OptionError, layer_yaml
from structured_compress.layers.lowrank import LowRankConfig, LowRankLinear
from structured_compress.surgery import compress_

from .conftest import CONFIG_DIR


def fields_of(cls: type[LayerConfig]) -> list[tuple[dataclasses.Field, typing.Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def leaf_types(annotation) -> set:
    """int / float / str / bool / list / Literal leaves of an annotation (None left out)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(leaf_types(a) for a in args))
    if origin is typing.Literal:
        return {"literal"}
    if origin is list:
        return {"list"}
    return set() if annotation is type(None) else {annotation}


def test_every_layer_type_has_a_registered_config():
    assert set(LAYERS) <= set(CONFIGS) and set(CONFIGS) - set(LAYERS) == {"auto"}  # auto: a plan over the others
    for name, cls in LAYERS.items():
        assert cls.Config is CONFIGS[name] and cls.Config.layer_type == name


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_option_declares_its_doc_and_check(name):
    """A numeric option without bounds (or a choice without a Literal) could take any value: not allowed."""
    for field, annotation in fields_of(CONFIGS[name]):
        assert field.metadata.get("doc"), f"{name}.{field.name} has no doc"
        if leaf_types(annotation) & {int, float}:
            assert field.metadata["bounds"], f"{name}.{field.name} is a number without a range"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_yaml_is_generated_from_the_dataclass(name):
    path = CONFIG_DIR / "layer" / f"{name}.yaml"
    assert path.read_text() == layer_yaml(CONFIGS[name]), f"run: python scripts/write_layer_configs.py ({path.name})"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_yaml_defaults_equal_the_dataclass_defaults(name):
    cls = CONFIGS[name]
    group = OmegaConf.to_container(OmegaConf.create({"layer": OmegaConf.load(CONFIG_DIR / "layer" / f"{name}.yaml")}),
                                   resolve=True)["layer"]
    assert group["name"] == name
    assert cls.from_options(group["options"], group["budget"], group["budget_of"]) == cls()
    assert group["calibration_batches"] == cls.calibration_batches


def bad_values(annotation, bounds: dict) -> list:
    """Values of the wrong type and, per bound, one just outside it."""
    leaves = leaf_types(annotation)
    wrong = ["abc"] if leaves & {int, float, bool, "list"} or "literal" in leaves else [3]
    if str in leaves and "literal" not in leaves:
        wrong = [3]
    if "literal" in leaves:
        wrong.append("not-a-choice")
    outside = []
    for kind, bound in bounds.items():
        step = 1 if int in leaves and float not in leaves else 0.5
        value = {"ge": bound - step, "gt": bound, "le": bound + step, "lt": bound}[kind]
        outside.append([value] if "list" in leaves else value)
    return wrong + outside


CASES = [(name, field.name, value) for name, cls in sorted(CONFIGS.items()) for field, annotation in fields_of(cls)
         for value in bad_values(annotation, field.metadata.get("bounds", {}))]


@pytest.mark.parametrize("name,option,value", CASES, ids=[f"{n}-{o}-{v}" for n, o, v in CASES])
def test_bad_option_fails_in_one_line_naming_the_key(name, option, value):
    cls = CONFIGS[name]
    group = {"name": name, "options": {}, "calibration_batches": 8}
    if option in ("budget", "budget_of") or option in cls.promoted:
        group[option] = value
        if option in cls.promoted:
            group["options"][option] = value
        key = f"layer.{option}"
    else:
        group["options"][option] = value
        key = f"layer.options.{option}"
    with pytest.raises(ConfigError) as caught:
        check_layer(group)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{key}="), message


def test_unknown_option_names_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"^layer\.options\.rnk=3: .*did you mean rank\?"):
        check_layer({"name": "lowrank", "options": {"rnk": 3}})
    with pytest.raises(OptionError, match=r"rnk=3: .*did you mean rank\?"):
        compress_(nn.Sequential(nn.Linear(8, 8)), "lowrank", 0.5, options={"rnk": 3})


def test_budget_below_one_component_is_an_error_not_a_silent_rank_one():
    model = nn.Sequential(nn.Linear(768, 768))
    with pytest.raises(OptionError, match=r"budget=0.0001: keeps less than one rank-1 component.*at least 0.0026"):
        compress_(model, "lowrank", 0.0001)


def test_config_objects_and_names_build_the_same_layers():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    by_name, by_config = copy.deepcopy(dense), copy.deepcopy(dense)
    compress_(by_name, "lowrank", 0.5, options={"rank": 3})
    report = compress_(by_config, {"0": LowRankConfig(budget=0.5, rank=3), "*": LowRankConfig(rank=2)})
    assert torch.equal(by_name[0].left, by_config[0].left) and by_config[2].rank == 2
    assert report.layers[0].options == {"rank": 3, "init": "svd"} and report.layers[0].budget_of == "params"
    with pytest.raises(ValueError, match="set them in the config"):
        compress_(dense, LowRankConfig(), budget=0.5)


@pytest.mark.parametrize("option,value", [("rank", 4), ("init", "whiten")])
def test_every_lowrank_option_acts(option, value):
    torch.manual_seed(0)
    weight, inputs = torch.randn(16, 24), torch.randn(64, 24) @ torch.randn(24, 24)
    gram = (inputs.T @ inputs).double()
    default = LowRankLinear.from_dense(weight, None, LowRankConfig(budget=0.3), gram=gram)
    changed = LowRankLinear.from_dense(weight, None, LowRankConfig(budget=0.3, **{option: value}), gram=gram)
    assert not torch.allclose(default.to_dense_weight(), changed.to_dense_weight())


def test_whiten_without_calibration_names_the_fix():
    with pytest.raises(OptionError, match="needs calibration gram.*calibration_batches"):
        LowRankLinear.from_dense(torch.randn(8, 8), None, LowRankConfig(init="whiten"))
    with pytest.raises(ConfigError,
                       match=r"^layer\.calibration_batches=0: layer=lowrank init=whiten .*needs calibration gram"):
        check_layer({"name": "lowrank", "options": {"init": "whiten"}, "calibration_batches": 0})
