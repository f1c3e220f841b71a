"""A model's structured layers as recorded entries (name, type, shape, ``config()``, conv geometry) and back.

Checkpoints (``pipeline.StructureRecord``) and compressed folders (``manifest.json``) record the same entries;
:func:`install_structured_layers` is the one function that rebuilds them inside a dense model, for both.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..layers import StructuredConv2d, StructuredLinear, get_layer_class
from ..modeltree import dense_view, replace_child
from .storage import dtype_name, parse_dtype


def structured_layers(model: nn.Module) -> dict[str, StructuredLinear | StructuredConv2d]:
    """Every structured layer by qualified name; a conv wrapper stands for the linear map inside it."""
    found: dict[str, nn.Module] = {}
    convs = set()
    for name, module in model.named_modules():
        if isinstance(module, StructuredConv2d):
            found[name] = module
            convs.add(name)
        elif isinstance(module, StructuredLinear) and name.rpartition(".")[0] not in convs:
            found[name] = module
    return found


def layer_entry(name: str, module: StructuredLinear | StructuredConv2d) -> dict[str, Any]:
    """What rebuilding the layer ``name`` needs: its type, shape, ``config()`` and conv geometry (or None)."""
    linear = module.linear if isinstance(module, StructuredConv2d) else module
    conv = None
    if isinstance(module, StructuredConv2d):
        conv = {"in_channels": module.in_channels, "kernel_size": list(module.kernel_size),
                "stride": list(module.stride), "padding": list(module.padding), "dilation": list(module.dilation),
                "form": module.form}
    return {"name": name, "type": linear.layer_type, "out_features": linear.out_features,
            "in_features": linear.in_features, "config": linear.config(), "conv": conv}


def build_layer_from_entry(entry: Mapping[str, Any]) -> nn.Module:
    """The layer an entry describes, freshly constructed (no weights yet)."""
    linear = get_layer_class(entry["type"])(entry["in_features"], entry["out_features"], **entry["config"])
    conv = entry.get("conv")
    if conv is None:
        return linear
    return StructuredConv2d(linear, conv["in_channels"], tuple(conv["kernel_size"]), tuple(conv["stride"]),
                            tuple(conv["padding"]), tuple(conv["dilation"]), conv.get("form", "native"))


def _check_fits(model: nn.Module, entry: Mapping[str, Any], origin: str) -> None:
    """Raise a ValueError naming the layer unless ``model`` has, at ``entry['name']``, a dense or structured
    layer of the recorded ``out_features x in_features``."""
    name = entry["name"]
    try:
        current = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"layer {name!r} recorded in {origin} is missing from the model skeleton") from None
    if isinstance(current, StructuredConv2d):
        current = current.linear
    if isinstance(current, StructuredLinear):
        shape = (current.out_features, current.in_features)
    elif (view := dense_view(current)) is not None:
        shape = tuple(view[1].shape)
    else:
        raise ValueError(f"skeleton module {name!r} is a {type(current).__name__}, not a layer that a "
                         f"{entry['type']!r} layer can replace")
    if shape != (entry["out_features"], entry["in_features"]):
        raise ValueError(f"shape mismatch for layer {name!r}: {origin} records "
                         f"{entry['out_features']}x{entry['in_features']}, the skeleton has {shape[0]}x{shape[1]}")


def _fill_optional_parameters(module: nn.Module, state: Mapping[str, torch.Tensor], prefix: str) -> None:
    """Create parameters a layer registers as ``None`` until used (e.g. a QAT latent weight) when ``state``
    holds them, so the state dict loads strictly."""
    for name, sub in module.named_modules():
        for key, value in list(sub._parameters.items()):
            full = ".".join(p for p in (prefix, name, key) if p)
            if value is None and full in state:
                sub._parameters[key] = nn.Parameter(torch.empty_like(state[full], device="cpu"))


def install_structured_layers(model: nn.Module, entries: Iterable[Mapping[str, Any]],
                              state: Mapping[str, torch.Tensor], origin: str) -> None:
    """Replace, in place, each layer of ``model`` that an entry names by the structured layer it records
    (no decomposition) in that module's train/eval mode, ready for ``model.load_state_dict(state, strict=True)``.

    Every entry is checked against the module it replaces first (``origin``, e.g. ``"the manifest"``, names
    the record in the error). Constructors that draw random inits leave the caller's RNG untouched.
    """
    entries = list(entries)
    for entry in entries:
        _check_fits(model, entry, origin)
    with torch.random.fork_rng(devices=[]):
        for entry in entries:  # in the replaced module's mode: e.g. Gaudi's eval forward is another path
            mode = model.get_submodule(entry["name"]).training
            replace_child(model, entry["name"], build_layer_from_entry(entry).train(mode))
    for entry in entries:
        _fill_optional_parameters(model.get_submodule(entry["name"]), state, entry["name"])


def layer_problems(entry: Mapping[str, Any], described: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Every way the tensors ``described`` (key -> table entry) under layer ``entry['name']`` differ from what
    the layer's type and ``config()`` build: missing or extra tensors, shapes, dtypes (integer dtypes exactly,
    floating ones as floating)."""
    label = f"layer {entry['name']!r} ({entry['type']})"
    try:
        with torch.device("meta"):
            expected = build_layer_from_entry(entry).state_dict()
    except Exception as err:  # any constructor failure means the recorded config cannot rebuild the layer
        return [f"{label}: its config {entry['config']} does not build the layer: {err}"]
    prefix = entry["name"] + "."
    actual = {key[len(prefix):]: value for key, value in described.items() if key.startswith(prefix)}
    problems = [f"{label}: tensor {key!r} is missing" for key in expected if key not in actual]
    problems += [f"{label}: tensor {key!r} is not part of the layer its config builds" for key in actual
                 if key not in expected]
    for key, tensor in expected.items():
        if key not in actual:
            continue
        shape, dtype = actual[key]["shape"], parse_dtype(actual[key]["dtype"], f"tensors[{prefix}{key}]")
        if shape != list(tensor.shape):
            problems.append(f"{label}: tensor {key!r} has shape {shape}, its config implies {list(tensor.shape)}")
        if tensor.is_floating_point() != dtype.is_floating_point or (
                not dtype.is_floating_point and dtype != tensor.dtype):
            implied = "a floating dtype" if tensor.is_floating_point() else dtype_name(tensor.dtype)
            problems.append(f"{label}: tensor {key!r} has dtype {dtype_name(dtype)}, its config implies {implied}")
    return problems
