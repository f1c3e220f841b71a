"""Typed layer configs: one dataclass per layer type, defined in that type's own file (torchao's pattern), on the
typed-config base of ``typed_config.py``.

Each field is declared with :func:`option`: its type (the annotation), default, one-line doc and range in one
place. ``TypedConfig.__post_init__`` checks every field against them, so an option cannot exist without its
check, and a bad value fails when the config is built -- at compose time for ``run.py``, at the call for
``compress_``. ``configs/layer/<name>.yaml`` is generated from these classes (:func:`layer_yaml`), so defaults
are written once. Torch-free.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
from typing import Any, ClassVar, Literal, Mapping

from ..errors import show
from ..typed_config import OptionError, TypedConfig, option

CONFIGS: dict[str, type["LayerConfig"]] = {}


def register_config(cls: type["LayerConfig"]) -> type["LayerConfig"]:
    """Make ``cls`` the config of layer type ``cls.layer_type`` (``layer=<name>`` in configs)."""
    name = cls.layer_type
    if not name:
        raise TypeError(f"{cls.__name__} needs a layer_type class attribute")
    if name in CONFIGS and CONFIGS[name] is not cls:
        raise ValueError(f"layer type {name!r} has two configs ({CONFIGS[name].__name__}, {cls.__name__})")
    CONFIGS[name] = cls
    return cls


def config_class(name: str) -> type["LayerConfig"]:
    """The config class of layer type ``name``, with an error that lists the valid names."""
    if name not in CONFIGS:
        close = difflib.get_close_matches(str(name), list(CONFIGS), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise OptionError("layer", name, f"unknown layer type (choose one of {', '.join(sorted(CONFIGS))})",
                          f"{hint}pick it with layer=<name>")
    return CONFIGS[name]


@dataclasses.dataclass
class LayerConfig(TypedConfig):
    """What every layer type's config has: a ``budget``, what that budget counts (``budget_of``), and the
    type's own options as further fields. Subclasses set ``layer_type`` and may override
    :meth:`calibration_needed` and :meth:`validate` (checks that join several fields)."""

    layer_type: ClassVar[str] = ""
    # options also settable at the top of the layer group (layer.max_error=...), for short command lines
    promoted: ClassVar[tuple[str, ...]] = ()
    calibration_batches: ClassVar[int] = 0  # the YAML default of layer.calibration_batches for this type

    budget: float = option(1.0, "fraction of the dense layer's budget_of kept, in (0, 1]", gt=0, le=1)
    # a type whose budget counts something else redeclares this as Literal["macs"], ["bytes"] or ["none"]
    budget_of: Literal["params"] = option("params", "what budget counts: params (the numbers stored)")

    def calibration_needed(self) -> tuple[str, ...]:
        """The calibration inputs these settings need (``"gram"``, ``"inputs"``); empty for data-free ones."""
        return ()

    def options(self) -> dict[str, Any]:
        """The type's own options (every field but ``budget`` and ``budget_of``), as the report records them."""
        return {name: getattr(self, name) for name in self.option_names()}

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name not in ("budget", "budget_of")]

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None, budget: float | None = None,
                     budget_of: str | None = None) -> "LayerConfig":
        """The config from a mapping of option -> value (a YAML ``options`` block) and the group's ``budget``
        and ``budget_of`` (None = the type's defaults), naming an unknown key and the closest valid one."""
        options = dict(options or {})
        cls.check_keys(options, cls.option_names(), f"layer type {cls.layer_type}")
        group = {k: v for k, v in (("budget", budget), ("budget_of", budget_of)) if v is not None}
        return cls(**group, **options)


def layer_yaml(cls: type[LayerConfig]) -> str:
    """``configs/layer/<name>.yaml`` for ``cls``: its docstring and each option's doc as comments, its
    defaults as values. A test keeps the files equal to this, so edit the dataclass, then run
    ``python scripts/write_layer_configs.py``."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float) and math.isinf(v):
            return ".inf" if v > 0 else "-.inf"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}: {value(x)}" for k, x in v.items()) + "}"
        return show(v)

    def entry(indent: str, name: str, v: Any) -> list[str]:
        if isinstance(v, dict) and v:  # one line per key: the auto plan's choices stay readable
            return [f"{indent}{name}:"] + [f"{indent}  {k}: {value(x)}" for k, x in v.items()]
        return [f"{indent}{name}: {value(v)}"]

    fields = {f.name: f for f in dataclasses.fields(cls)}
    lines = [f"# GENERATED from {cls.__module__}.{cls.__name__} by scripts/write_layer_configs.py: edit the "
             "dataclass, not this file."]
    lines += [f"# {line}".rstrip() for line in inspect.cleandoc(cls.__doc__ or "").splitlines()]
    lines += [f"name: {cls.layer_type}",
              f"# {fields['budget'].metadata['doc']}", f"budget: {value(fields['budget'].default)}",
              f"# {fields['budget_of'].metadata['doc']}", f"budget_of: {value(fields['budget_of'].default)}",
              "# fnmatch patterns of the qualified layer names to replace, and of those to leave dense",
              'include: ["*"]', "exclude: []"]
    for name in cls.promoted:
        lines += [f"# {fields[name].metadata['doc']} (options.{name} follows it)",
                  f"{name}: {value(_default(fields[name]))}"]
    lines.append("options:" if cls.option_names() else "options: {}")
    for name in cls.option_names():
        field = fields[name]
        lines.append(f"  # {field.metadata['doc']}")
        lines += [f"  {name}: ${{layer.{name}}}"] if name in cls.promoted else entry("  ", name, _default(field))
    lines += ["# train batches run through the model first to collect layer inputs (data-aware settings need them)",
              f"calibration_batches: {cls.calibration_batches}",
              "# block by block where one stack of blocks holds every selected layer (HF decoder/encoder layers,",
              "# timm ViT blocks): each block calibrated on the compressed blocks' outputs, one block's data in memory",
              "sequential: true"]
    return "\n".join(lines) + "\n"


def _default(field: dataclasses.Field) -> Any:
    return field.default_factory() if field.default is dataclasses.MISSING else field.default
