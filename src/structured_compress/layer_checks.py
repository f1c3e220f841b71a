"""Compose-time check of the ``layer`` group: its keys, type names and every option, each through its layer
type's typed config (``layers/config.py``), so the ranges live with the options and nothing is restated here.

Torch-free at import; the layer types (and torch) load on the first check, still before any model or data.
"""
from __future__ import annotations

from typing import Mapping

from .errors import did_you_mean, fail

GROUP_KEYS = ("name", "budget", "budget_of", "include", "exclude", "options", "calibration_batches", "sequential")


def layer_configs() -> dict[str, type]:
    """Layer type name -> its config class, for every registered type (the planner's ``auto`` included)."""
    from . import surgery  # noqa: F401  (imports every layer type and the planner, which register their configs)
    from .layers.config import CONFIGS

    return dict(CONFIGS)


def check_layer(layer: Mapping) -> None:
    """Names, keys, patterns, budgets and options of the ``layer`` group (one type or pattern -> type)."""
    configs = layer_configs()
    names = layer.get("name")
    table = names if isinstance(names, Mapping) else {"*": names}
    for pattern, name in table.items():
        if name not in configs:
            key = f"layer.name.{pattern}" if isinstance(names, Mapping) else "layer.name"
            fail(key, name, f"unknown layer type (choose one of {', '.join(sorted(configs))})",
                 f"{did_you_mean(name, configs)}pick it with layer=<name>")
    types = list(dict.fromkeys(table.values()))
    allowed = set(GROUP_KEYS) | {k for t in types for k in configs[t].promoted}
    for key in layer:
        if key not in allowed:
            owners = sorted(t for t, c in configs.items() if key in c.promoted)
            hint = f"it belongs to layer={'/'.join(owners)}, not layer={'/'.join(types)}; " if owners else ""
            fail(f"layer.{key}", layer[key], f"unknown key (valid keys: {', '.join(sorted(allowed))})",
                 f"{hint}{did_you_mean(key, allowed)}remove or rename it")
    for key in ("include", "exclude"):
        value = layer.get(key)
        if value is not None and not isinstance(value, str) and not (
                isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value)):
            fail(f"layer.{key}", value, "must be a list of fnmatch patterns of layer names",
                 f"e.g. layer.{key}=[blocks.*]")
    batches = layer.get("calibration_batches", 0)
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 0:
        fail("layer.calibration_batches", batches, "must be an integer >= 0", "e.g. layer.calibration_batches=8")
    if not isinstance(layer.get("sequential", True), bool):
        fail("layer.sequential", layer["sequential"], "must be true or false",
             "layer.sequential=false compresses every layer at once")
    for layer_type in types:
        for config in _configs_of(layer, layer_type, configs[layer_type], several=isinstance(names, Mapping)):
            needed = config.calibration_needed()
            if needed and batches <= 0:
                changed = {k: v for k, v in config.options().items() if v != getattr(type(config)(), k)}
                settings = " ".join(f"{k}={v}" for k, v in changed.items())
                fail("layer.calibration_batches", batches, f"layer={layer_type} {settings} is data-aware and needs "
                     f"calibration {' and '.join(needed)}", "add layer.calibration_batches=4 (train batches run "
                     "through the model first)")


def _configs_of(layer: Mapping, layer_type: str, cls: type, several: bool) -> list:
    """The typed configs the group makes for ``layer_type``: one per budget (a budget may be pattern -> value)."""
    from .layers.config import OptionError

    options = layer.get("options") or {}
    prefix = "layer.options."
    if several:
        unknown = [k for k in options if k not in (layer.get("name") or {}).values()]
        if unknown:
            types = sorted(set((layer.get("name") or {}).values()))
            fail(f"layer.options.{unknown[0]}", options[unknown[0]], f"with several layer types, options are keyed "
                 f"by type ({', '.join(types)})",
                 f"{did_you_mean(unknown[0], types)}e.g. layer.options.<type>.<option>")
        options, prefix = options.get(layer_type) or {}, f"layer.options.{layer_type}."
    if not isinstance(options, Mapping):
        fail(prefix.rstrip("."), options, "must be a mapping of option -> value", f"e.g. {prefix}<option>=<value>")
    budget = layer.get("budget", cls.__dataclass_fields__["budget"].default)
    budgets = budget if isinstance(budget, Mapping) else {None: budget}
    built = []
    for pattern, value in budgets.items():
        try:
            built.append(cls.from_options(options, value, None if several else layer.get("budget_of")))
        except OptionError as err:
            group_level = err.option in ("budget", "budget_of") or err.option in cls.promoted
            key = f"layer.{err.option}" if group_level else f"{prefix}{err.option}"
            if err.option == "budget" and pattern is not None:
                key = f"layer.budget.{pattern}"
            fail(key, err.value, err.problem, err.fix)
    return built
