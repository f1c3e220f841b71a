"""The model tree: which submodules are dense linear maps that can be replaced, and how to swap one.

The bottom of the package (torch only): surgery, io, the planner and the FLOP counter all import it, and it
imports nothing of the project's.
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Iterable, Sequence

from torch import Tensor, nn

FilterFn = Callable[[nn.Module, str], bool]


def is_hf_conv1d(module: nn.Module) -> bool:
    """A Hugging Face ``Conv1D`` (GPT-2's linear maps, weight stored [in, out]), found by duck typing."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def dense_view(module: nn.Module) -> tuple[str, Tensor, Tensor | None] | None:
    """``(kind, weight [out, in], bias)`` for a module surgery can replace, else ``None``."""
    if isinstance(module, nn.Linear):
        return "linear", module.weight, module.bias
    if is_hf_conv1d(module):
        return "conv1d", module.weight.t(), module.bias
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            return None
        return "conv2d", module.weight.reshape(module.out_channels, -1), module.bias
    return None


def candidate_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every replaceable layer by qualified name (attention blocks that read ``out_proj.weight`` excluded)."""
    found = {}
    for parent_name, parent in model.named_modules():
        if isinstance(parent, nn.MultiheadAttention):
            continue
        for child_name, child in parent.named_children():
            if dense_view(child) is not None:
                found[f"{parent_name}.{child_name}" if parent_name else child_name] = child
    return found


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _as_patterns(patterns: str | Sequence[str] | None, default: Sequence[str]) -> list[str]:
    if patterns is None:
        return list(default)
    if isinstance(patterns, str):
        return [patterns]
    return list(patterns)


def select_layers(model: nn.Module, include: str | Sequence[str] | None = None,
                  exclude: str | Sequence[str] | None = None,
                  filter_fn: FilterFn | None = None) -> dict[str, nn.Module]:
    """The candidate layers matching ``include`` and no ``exclude`` pattern; every include pattern must match."""
    include, exclude = _as_patterns(include, ["*"]), _as_patterns(exclude, [])
    candidates = candidate_layers(model)
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no nn.Linear, HF Conv1D or nn.Conv2d layer to replace")
    for pattern in include:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in candidates):
            shown = ", ".join(list(candidates)[:8]) + (", ..." if len(candidates) > 8 else "")
            raise ValueError(
                f"include pattern {pattern!r} matched no replaceable layer; patterns are fnmatch-style over "
                f"qualified module names such as: {shown}"
            )
    return {
        name: module for name, module in candidates.items()
        if _matches(name, include) and not _matches(name, exclude) and (filter_fn is None or filter_fn(module, name))
    }


def replace_child(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` (dotted path) is."""
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, new)
