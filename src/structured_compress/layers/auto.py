"""``layer=auto``: a per-layer codec plan that meets a byte target (or a quality floor) from calibration data.

Every selected layer is tried with each codec choice (e.g. int8, int4 per 128, int4 per 64, all GPTQ-rounded);
each try gives ``(bytes, error)`` with ``error = ||(W_hat - W) X^T||^2 / ||W X^T + b||^2`` on the layer's
calibration inputs (squared, so layers add up), and keeping the layer as it is counts as fp16 bytes at error
0. Starting from every layer kept, the plan repeatedly takes the cheapest step down -- the smallest error
increase per byte saved among the layers' next options on their lower convex hull -- until the replaced
layers fit ``target_bytes`` (or ``fp16 bytes / target_ratio``), or while the summed error stays within
``max_error``. On convex error-vs-bytes curves this greedy order is the optimal trade-off (it solves the
Lagrangian relaxation of the knapsack exactly at every budget it stops on).

Layers do not matter equally: a layer whose error the rest of the network damps (or amplifies) should spend
fewer (more) bytes. ``weights`` scales each layer's errors by its end-to-end gain, which
:func:`output_weights` measures by perturbing one layer at a time: the model output's squared relative error
with only that layer compressed (by a probe choice), divided by that layer's own error under the same choice.
The summed weighted errors then estimate the model-output error (to first order), and the plan spends bytes
where the output says.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .base import StructuredLinear, get_layer_class

log = logging.getLogger(__name__)

KEEP = "keep"  # the choice name for a layer left as it is (counted at fp16)


@dataclass(frozen=True)
class Option:
    """One way to store one layer: its bytes and its squared relative output error."""

    choice: str
    bytes: int
    error: float


def lower_hull(options: Sequence[Option]) -> list[Option]:
    """The options on the lower convex hull of error vs bytes, most bytes first: the others are never worth it
    (some mix of hull neighbours saves as many bytes for less error)."""
    pareto = [o for o in options if not any(p.bytes <= o.bytes and p.error <= o.error and p != o for p in options)]
    hull: list[Option] = []
    for option in sorted(pareto, key=lambda o: -o.bytes):
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) >= _slope(hull[-1], option):
            hull.pop()
        hull.append(option)
    return hull


def _slope(bigger: Option, smaller: Option) -> float:
    """Error added per byte saved going from ``bigger`` to ``smaller``."""
    return (smaller.error - bigger.error) / max(1, bigger.bytes - smaller.bytes)


def greedy_plan(table: Mapping[str, Sequence[Option]], target_bytes: float | None = None,
                max_error: float | None = None) -> dict[str, Option]:
    """Per layer, the option the greedy order reaches (see the module doc): stop as soon as the total bytes are
    ``<= target_bytes``, or before the summed error would exceed ``max_error``. Exactly one bound is given."""
    if (target_bytes is None) == (max_error is None):
        raise ValueError("layer=auto needs exactly one of target_bytes / target_ratio or max_error")
    hulls = {name: lower_hull(options) for name, options in table.items()}
    position = {name: 0 for name in hulls}
    total_bytes = sum(h[0].bytes for h in hulls.values())
    total_error = sum(h[0].error for h in hulls.values())
    while target_bytes is None or total_bytes > target_bytes:
        steps = [(_slope(h[position[n]], h[position[n] + 1]), n) for n, h in hulls.items() if position[n] + 1 < len(h)]
        if not steps:
            break
        _, name = min(steps)
        current, following = hulls[name][position[name]], hulls[name][position[name] + 1]
        if max_error is not None and total_error + following.error - current.error > max_error:
            break
        position[name] += 1
        total_bytes += following.bytes - current.bytes
        total_error += following.error - current.error
    if target_bytes is not None and total_bytes > target_bytes:
        log.warning("layer=auto: the smallest plan takes %d bytes, above the target %d", total_bytes, target_bytes)
    return {name: hulls[name][position[name]] for name in hulls}


def layer_options(weight: Tensor, bias: Tensor | None, calibration: Mapping[str, Tensor],
                  choices: Mapping[str, Mapping]) -> list[Option]:
    """``(bytes, error)`` of every choice for one layer (``weight`` out x in), plus keeping it at fp16."""
    inputs = calibration["inputs"].reshape(-1, weight.shape[1]).float()
    dense = weight.detach().float()
    reference = torch.nn.functional.linear(inputs, dense, None if bias is None else bias.float()).square().sum()
    kept_bytes = 2 * (weight.numel() + (0 if bias is None else bias.numel()))
    options = [Option(KEEP, kept_bytes, 0.0)]
    for choice, spec in choices.items():
        layer = _build(spec, weight, bias, calibration)
        error = (inputs @ (layer.to_dense_weight().float() - dense).T).square().sum() / reference.clamp(min=1e-30)
        options.append(Option(choice, layer.storage_bytes(), error.item()))
    return options


def _build(spec: Mapping, weight: Tensor, bias: Tensor | None, calibration: Mapping[str, Tensor]) -> StructuredLinear:
    from ..surgery import _call_from_dense

    if "layer" not in spec:
        raise ValueError(f"layer=auto choice {dict(spec)} needs a 'layer' key (a layer type such as svdq)")
    cls = get_layer_class(spec["layer"])
    return _call_from_dense(cls, weight, bias, spec.get("budget", 1.0), dict(spec.get("options") or {}), calibration)


def _calibrated_layers(model: nn.Module, calibration, include, exclude, filter_fn) -> dict[str, nn.Module]:
    """The selected layers, or a ValueError when one has no calibration inputs."""
    from ..modeltree import select_layers

    selected = select_layers(model, include, exclude, filter_fn)
    missing = [name for name in selected if name not in (calibration or {})]
    if missing:
        raise ValueError(f"layer=auto needs calibration inputs for every layer (missing {missing[:3]}...): "
                         "set layer.calibration_batches > 0")
    return selected


@torch.no_grad()
def output_weights(model: nn.Module, calibration: Mapping[str, Mapping[str, Tensor]], probe: Mapping,
                   batches: Iterable, forward: Callable[[nn.Module, object], object],
                   output: Callable[[object], Tensor] = lambda out: out, include=None, exclude=None,
                   filter_fn=None) -> dict[str, float]:
    """Per selected layer, its end-to-end gain: the squared relative error of ``output(forward(model, batch))``
    over ``batches`` with only that layer compressed by ``probe`` (a choice spec such as
    ``{"layer": "svdq", "options": {"bits": 4, ...}}``), divided by the layer's own squared relative output
    error under ``probe`` (as :func:`layer_options` measures it). Pass the result as ``weights``."""
    from ..surgery import compress_, dense_view, replace_child

    batches = list(batches)
    reference = [output(forward(model, batch)).float() for batch in batches]
    scale = sum(ref.square().sum() for ref in reference).clamp(min=1e-30)
    weights = {}
    for name, module in _calibrated_layers(model, calibration, include, exclude, filter_fn).items():
        _, weight, bias = dense_view(module)
        layer_error = layer_options(weight, bias, calibration[name], {"probe": probe})[1].error
        compress_(model, probe["layer"], probe.get("budget", 1.0), include=[name], options=probe.get("options"),
                  calibration={name: calibration[name]})
        error = sum((output(forward(model, batch)).float() - ref).square().sum()
                    for batch, ref in zip(batches, reference)) / scale
        replace_child(model, name, module)
        weights[name] = error.item() / max(layer_error, 1e-30)
    log.info("layer=auto output weights: min %.3g, max %.3g", min(weights.values()), max(weights.values()))
    return weights


def compress_auto_(model: nn.Module, calibration: Mapping[str, Mapping[str, Tensor]] | None,
                   choices: Mapping[str, Mapping] | None = None, include=None, exclude=None, filter_fn=None,
                   target_bytes: int | None = None, target_ratio: float | None = None,
                   max_error: float | None = None, weights: Mapping[str, float] | None = None):
    """Plan (see the module doc) and apply: each layer gets its chosen codec through ``compress_``; layers
    whose plan is ``keep`` stay as they are. ``weights`` (per layer name, e.g. from :func:`output_weights`)
    multiply each layer's errors; layers it does not name keep weight 1. Returns the merged
    ``CompressionReport`` with each row's ``options`` holding the plan entry (choice, bytes, error)."""
    from ..surgery import CompressionReport, compress_, dense_view

    if not choices:
        raise ValueError("layer=auto needs options.choices: name -> {layer: <type>, options: {...}}")
    selected = _calibrated_layers(model, calibration, include, exclude, filter_fn)
    table = {}
    for name, module in selected.items():
        _, weight, bias = dense_view(module)
        gain = (weights or {}).get(name, 1.0)
        table[name] = [Option(o.choice, o.bytes, o.error * gain)
                       for o in layer_options(weight, bias, calibration[name], choices)]
    if target_ratio is not None:
        if target_bytes is not None:
            raise ValueError("layer=auto takes target_bytes or target_ratio, not both")
        target_bytes = sum(options[0].bytes for options in table.values()) / target_ratio
    plan = greedy_plan(table, target_bytes, max_error)
    report = CompressionReport(model_params_before=sum(p.numel() for p in model.parameters()))
    for choice, spec in choices.items():
        names = [name for name, option in plan.items() if option.choice == choice]
        if names:
            part = compress_(model, spec["layer"], spec.get("budget", 1.0), include=names,
                             options=spec.get("options"), calibration={n: calibration[n] for n in names})
            for row in part.layers:
                row.options = {**row.options, "auto_choice": choice, "auto_bytes": plan[row.name].bytes,
                               "auto_error": plan[row.name].error}
            report.layers.extend(part.layers)
    report.model_params_after = report.model_params_before - report.params_before + report.params_after
    log.info("layer=auto plan: %s", {c: sum(o.choice == c for o in plan.values()) for c in [KEEP, *choices]})
    return report
