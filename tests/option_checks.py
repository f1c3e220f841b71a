"""Shared checks for the per-type option tests (``test_layer_options_*.py``): a bad value fails when the config
is built and names its option; every option changes the layer it builds."""
from __future__ import annotations

import pytest
import torch

from structured_compress.layers.base import StructuredLinear
from structured_compress.layers.config import LayerConfig, OptionError


def assert_rejected(config_class: type[LayerConfig], option: str, value, **others) -> None:
    """``config_class(option=value, **others)`` raises an :class:`OptionError` that names ``option``."""
    with pytest.raises(OptionError, match=rf"^{option}=") as caught:
        config_class(**{**others, option: value})
    assert caught.value.option == option


def differs(first: StructuredLinear, second: StructuredLinear) -> bool:
    """Whether two layers differ in structure (their ``config()``) or in any stored tensor."""
    if first.config() != second.config():
        return True
    one, other = first.state_dict(), second.state_dict()
    return one.keys() != other.keys() or any(not torch.equal(one[k], other[k]) for k in one)


def assert_option_acts(cls: type[StructuredLinear], weight: torch.Tensor, base: dict, changed: dict,
                       **calibration) -> None:
    """Building ``weight`` with ``changed`` on top of ``base`` gives another layer than with ``base`` alone."""
    before = cls.from_dense(weight, None, cls.Config(**base), **calibration)
    after = cls.from_dense(weight, None, cls.Config(**{**base, **changed}), **calibration)
    assert differs(before, after), f"{cls.layer_type}: {changed} on top of {base} changed nothing"


def covered(config_class: type[LayerConfig], table: dict, unused: tuple[str, ...] = ()) -> None:
    """``table`` has a row for every option of ``config_class`` and its budget (unless ``unused``)."""
    assert set(table) == {"budget", *config_class.option_names()} - set(unused)
