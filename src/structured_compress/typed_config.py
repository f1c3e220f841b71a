"""Typed configs: dataclasses whose fields declare type, default, doc and range in one place (:func:`option`),
checked when an instance is built. Layer types (``layers/config.py``) and the storage policy build on it.
Torch-free, and the bottom of the package's imports besides ``errors``.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Mapping

from .errors import UserInputError, show

BOUNDS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
          "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


class OptionError(UserInputError):
    """A layer option that cannot work: ``<option>=<value>: <problem>; <fix>``. ``option`` names the field, so
    a caller can prefix it with where it came from (``layer.options.``)."""

    def __init__(self, option: str, value: Any, problem: str, fix: str):
        self.option, self.value, self.problem, self.fix = option, value, problem, fix
        super().__init__(f"{option}={show(value)}: {problem}; {fix}")

    def with_prefix(self, prefix: str) -> str:
        """The message with the option's full key, e.g. ``layer.options.sweeps=-3: ...``."""
        return f"{prefix}{self.option}={show(self.value)}: {self.problem}; {self.fix}"


def option(default: Any, doc: str, **bounds: float) -> Any:
    """A config field: ``default``, a one-line ``doc`` (it becomes the YAML comment) and numeric ``bounds``
    (``ge``/``gt``/``le``/``lt``; on a list they bound every item). Choices are ``Literal`` annotations."""
    unknown = set(bounds) - set(BOUNDS)
    if unknown:
        raise TypeError(f"option() takes bounds {sorted(BOUNDS)}, not {sorted(unknown)}")
    metadata = {"doc": doc, "bounds": bounds}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class TypedConfig:
    """Checks every field against its annotation and :func:`option` bounds when built, then :meth:`validate`."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, tuple):  # YAML/OmegaConf lists arrive as lists; Python callers may pass tuples
                value = list(value)
                object.__setattr__(self, field.name, value)
            try:
                check_value(field.name, value, hints[field.name], field.metadata.get("bounds", {}))
            except OptionError as err:  # say what the option is, so the allowed range makes sense
                raise OptionError(err.option, err.value, f"{err.problem} ({field.metadata.get('doc')})",
                                  err.fix) from None
        self.validate()

    def validate(self) -> None:
        """Checks that involve several fields (raise :class:`OptionError`)."""

    @classmethod
    def check_keys(cls, options: Mapping[str, Any], valid: list[str], owner: str) -> None:
        """An :class:`OptionError` for the first key of ``options`` that is not in ``valid``, naming the closest."""
        for key in options:
            if key not in valid:
                close = difflib.get_close_matches(str(key), valid, n=1)
                raise OptionError(key, options[key],
                                  f"{owner} has no such option (valid: {', '.join(valid) or 'none'})",
                                  f"{f'did you mean {close[0]}? ' if close else ''}remove or rename it")


def check_value(name: str, value: Any, annotation: Any, bounds: Mapping[str, float]) -> None:
    """Raise :class:`OptionError` unless ``value`` has the annotated type and lies within ``bounds``."""
    if not _has_type(value, annotation):
        described = _describe(annotation)
        choices = [show(a) for a in _literals(annotation)]
        close = difflib.get_close_matches(show(value), choices, n=1) if choices else []
        wanted = "one of those" if choices else "a value of that type"
        fix = f"did you mean {close[0]}?" if close else f"give {name} {wanted}"
        raise OptionError(name, value, f"expected {described}", fix)
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, float) and math.isnan(item):
            raise OptionError(name, value, "NaN is not a valid setting", "give a number")
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            for kind, bound in bounds.items():
                symbol, holds = BOUNDS[kind]
                if not holds(item, bound):
                    what = "every item " if isinstance(value, list) else ""
                    raise OptionError(name, value, f"{what}must be {symbol} {bound}", _fix_for(bounds, kind))


def _fix_for(bounds: Mapping[str, float], broken: str) -> str:
    """A value inside two-sided ``bounds`` (their middle, or the closed end), else the broken bound restated."""
    low, high = bounds.get("ge", bounds.get("gt")), bounds.get("le", bounds.get("lt"))
    if low is not None and high is not None:
        return f"give e.g. {show((low + high) / 2 if 'gt' in bounds or 'lt' in bounds else high)}"
    symbol = BOUNDS[broken][0]
    return f"give a value {symbol} {show(bounds[broken])}"


def _has_type(value: Any, annotation: Any) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in args)
    if origin is Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if origin is list:
        return isinstance(value, list) and len(value) > 0 and all(_has_type(v, args[0]) for v in value)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _literals(annotation: Any) -> list[Any]:
    """The choices a ``Literal`` (inside unions and lists too) allows."""
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    return [choice for arg in typing.get_args(annotation) for choice in _literals(arg)]


def _describe(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is Literal:
        return "one of " + ", ".join(show(a) for a in args)
    if origin is list:
        return f"a non-empty list of {_describe(args[0])}"
    if annotation is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))
