"""``layer=auto`` (:class:`AutoConfig`): a per-layer codec plan that meets a byte target (or a quality floor)
from calibration data.

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
from typing import Callable, Iterable, Literal, Mapping, Sequence

import torch
from torch import Tensor, nn

from .layers import StructuredLinear, get_layer_class
from .layers.config import LayerConfig, OptionError, config_class, option, register_config
from .modeltree import FilterFn, dense_view, replace_child, select_layers

log = logging.getLogger(__name__)

KEEP = "keep"  # the choice name for a layer left as it is (counted at fp16)


@dataclass(frozen=True)
class Option:
    """One way to store one layer: its bytes and its squared relative output error."""

    choice: str
    bytes: int
    error: float


@register_config
@dataclass
class AutoConfig(LayerConfig):
    """Per-layer codec plan: every layer is tried with each choice below on the calibration inputs, then a
    greedy plan picks per layer the choice with the least output error per byte saved until the replaced
    layers fit the target. Give exactly one of target_ratio, target_bytes or max_error.
      python run.py mode=compress experiment=tweets/minilm-dense layer=auto layer.target_ratio=3.5"""

    layer_type = "auto"
    promoted = ("target_ratio", "target_bytes", "max_error")
    calibration_batches = 8  # the plan and GPTQ need every layer's calibration inputs and Gram matrix
    budget_of: Literal["none"] = option("none", "what budget counts: none (the plan's target sets the size)")
    target_ratio: float | None = option(3.0, "fp16 bytes of the selected layers / planned bytes", gt=0)
    target_bytes: int | None = option(None, "planned bytes of the selected layers", ge=1)
    max_error: float | None = option(None, "quality floor: summed squared relative output error over the layers",
                                     gt=0)
    choices: dict = option({
        "int8": {"layer": "svdq", "options": {"bits": 8, "svd": False, "rounding": "gptq"}},
        "int4-g128": {"layer": "svdq", "options": {"bits": 4, "group_size": 128, "symmetric": False, "svd": False,
                                                   "rounding": "gptq"}},
        "int4-g64": {"layer": "svdq", "options": {"bits": 4, "group_size": 64, "symmetric": False, "svd": False,
                                                  "rounding": "gptq"}},
        "int4-g32": {"layer": "svdq", "options": {"bits": 4, "group_size": 32, "symmetric": False, "svd": False,
                                                  "rounding": "gptq"}},
    }, "label -> {layer: <type>, options: {...}}: the codecs a layer may get")
    weights: dict | None = option(None, "per layer name, a factor on its errors (e.g. from output_weights); "
                                  "layers not named keep 1")

    def validate(self) -> None:
        bounds = [k for k in ("target_ratio", "target_bytes", "max_error") if getattr(self, k) is not None]
        if len(bounds) != 1:
            raise OptionError("target_ratio", self.target_ratio, f"layer=auto needs exactly one of target_ratio, "
                              f"target_bytes, max_error (got {', '.join(bounds) or 'none'})",
                              "set the others to null, e.g. layer.target_ratio=null layer.max_error=0.05")
        if not self.choices:
            raise OptionError("choices", self.choices, "layer=auto needs at least one codec to choose from",
                              "e.g. choices={int8: {layer: svdq, options: {bits: 8}}}")
        self.choice_configs()

    def choice_configs(self) -> dict[str, LayerConfig]:
        """Each choice as its layer type's typed config (checked like any layer option)."""
        configs = {}
        for label, spec in self.choices.items():
            if not isinstance(spec, Mapping) or spec.get("layer") in (None, "auto"):
                raise OptionError(f"choices.{label}", spec, "must be {layer: <type>, options: {...}} with a "
                                  "layer type other than auto", "e.g. {layer: svdq, options: {bits: 8}}")
            try:
                configs[label] = config_class(spec["layer"]).from_options(spec.get("options"), spec.get("budget"))
            except OptionError as err:
                key = f"choices.{label}.{'layer' if err.option == 'layer' else 'options.' + err.option}"
                raise OptionError(key, err.value, err.problem, err.fix) from None
        return configs

    def calibration_needed(self) -> tuple[str, ...]:
        return ("gram", "inputs")


def lower_hull(options: Sequence[Option]) -> list[Option]:
    """The options on the lower convex hull of error vs bytes, most bytes first: the others are never worth it
    (some mix of hull neighbours saves as many bytes for less error)."""
    pareto = [o for o in options if not any(p.bytes <= o.bytes and p.error <= o.error and p != o for p in options)]
    hull: list[Option] = []
    for candidate in sorted(pareto, key=lambda o: -o.bytes):
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) >= _slope(hull[-1], candidate):
            hull.pop()
        hull.append(candidate)
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


def layer_from_dense(config: LayerConfig, weight: Tensor, bias: Tensor | None,
                calibration: Mapping[str, Tensor] | None = None, kernel_positions: int = 1) -> StructuredLinear:
    """The structured layer ``config`` makes from a dense ``weight`` [out, in], with the layer's calibration
    data (``gram``, ``inputs``) where it has any."""
    data = calibration or {}
    return get_layer_class(config.layer_type).from_dense(weight, bias, config, gram=data.get("gram"),
                                                         inputs=data.get("inputs"), kernel_positions=kernel_positions)


def layer_options(weight: Tensor, bias: Tensor | None, calibration: Mapping[str, Tensor],
                  choices: Mapping[str, LayerConfig]) -> list[Option]:
    """``(bytes, error)`` of every choice for one layer (``weight`` out x in), plus keeping it at fp16."""
    inputs = calibration["inputs"].reshape(-1, weight.shape[1]).float()
    dense = weight.detach().float()
    reference = torch.nn.functional.linear(inputs, dense, None if bias is None else bias.float()).square().sum()
    kept_bytes = 2 * (weight.numel() + (0 if bias is None else bias.numel()))
    options = [Option(KEEP, kept_bytes, 0.0)]
    for choice, config in choices.items():
        layer = layer_from_dense(config, weight, bias, calibration)
        error = (inputs @ (layer.to_dense_weight().float() - dense).T).square().sum() / reference.clamp(min=1e-30)
        options.append(Option(choice, layer.storage_bytes(), error.item()))
    return options


def _calibrated_layers(model: nn.Module, calibration, include, exclude, filter_fn) -> dict[str, nn.Module]:
    """The selected layers, or a ValueError when one has no calibration inputs."""
    selected = select_layers(model, include, exclude, filter_fn)
    missing = [name for name in selected if name not in (calibration or {})]
    if missing:
        raise OptionError("calibration_batches", 0, f"layer=auto needs calibration inputs for every layer "
                          f"(missing {missing[:3]}...)", "set layer.calibration_batches > 0")
    return selected


@torch.no_grad()
def output_weights(model: nn.Module, calibration: Mapping[str, Mapping[str, Tensor]], probe: Mapping,
                   batches: Iterable, forward: Callable[[nn.Module, object], object],
                   output: Callable[[object], Tensor] = lambda out: out, include=None, exclude=None,
                   filter_fn: FilterFn | None = None) -> dict[str, float]:
    """Per selected layer, its end-to-end gain: the squared relative error of ``output(forward(model, batch))``
    over ``batches`` with only that layer compressed by ``probe`` (a choice spec such as
    ``{"layer": "svdq", "options": {"bits": 4, ...}}``), divided by the layer's own squared relative output
    error under ``probe`` (as :func:`layer_options` measures it). Pass the result as ``weights``."""
    probe_config = AutoConfig(choices={"probe": dict(probe)}).choice_configs()
    batches = list(batches)
    reference = [output(forward(model, batch)).float() for batch in batches]
    scale = sum(ref.square().sum() for ref in reference).clamp(min=1e-30)
    weights = {}
    for name, module in _calibrated_layers(model, calibration, include, exclude, filter_fn).items():
        _, weight, bias = dense_view(module)
        layer_error = layer_options(weight, bias, calibration[name], probe_config)[1].error
        probed = layer_from_dense(probe_config["probe"], weight.detach(), bias, calibration[name])
        replace_child(model, name, probed)
        error = sum((output(forward(model, batch)).float() - ref).square().sum()
                    for batch, ref in zip(batches, reference)) / scale
        replace_child(model, name, module)
        weights[name] = error.item() / max(layer_error, 1e-30)
    log.info("layer=auto output weights: min %.3g, max %.3g", min(weights.values()), max(weights.values()))
    return weights


def plan_layers(model: nn.Module, config: AutoConfig, calibration: Mapping[str, Mapping[str, Tensor]] | None,
                include=None, exclude=None, filter_fn: FilterFn | None = None) -> dict[str, tuple[LayerConfig, dict]]:
    """Plan (see the module doc): per layer that gets a codec, its config and the plan entry (choice, bytes,
    error) for the report; layers whose plan is ``keep`` are left out. ``config.weights`` multiply each
    layer's errors."""
    choices = config.choice_configs()
    selected = _calibrated_layers(model, calibration, include, exclude, filter_fn)
    table = {}
    for name, module in selected.items():
        _, weight, bias = dense_view(module)
        gain = (config.weights or {}).get(name, 1.0)
        table[name] = [Option(o.choice, o.bytes, o.error * gain)
                       for o in layer_options(weight, bias, calibration[name], choices)]
    target_bytes = config.target_bytes
    if config.target_ratio is not None:
        target_bytes = sum(options[0].bytes for options in table.values()) / config.target_ratio
    plan = greedy_plan(table, target_bytes, config.max_error)
    log.info("layer=auto plan: %s", {c: sum(o.choice == c for o in plan.values()) for c in [KEEP, *choices]})
    return {name: (choices[o.choice], {"auto_choice": o.choice, "auto_bytes": o.bytes, "auto_error": o.error})
            for name, o in plan.items() if o.choice != KEEP}
