"""Per-layer timing of structured convs against their dense kernels, and the choice of each conv's form.

A structured conv at a small shape (few channels, a large feature map, a budget near break-even) can run
slower than the dense conv it replaced, whatever its form. :func:`choose_conv_forms` times each
:class:`StructuredConv2d` of a model on its real input shape -- the native form against ``F.conv2d`` with the
dense kernel -- and sets ``form = "dense"`` (a cached dense kernel, inference only) where the dense kernel is
faster, and says so: in the log, in the returned timings and, when given, in the compression report's
``conv_form`` column. It is an explicit call with an example input, so a model's forms never change behind
the caller's back; set ``StructuredConv2d.form`` by hand for a fixed choice.
"""
from __future__ import annotations

import logging
import time

import torch
from torch import Tensor, nn

from .layers.conv import StructuredConv2d

log = logging.getLogger(__name__)


def structured_convs(model: nn.Module) -> dict[str, StructuredConv2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, StructuredConv2d)}


@torch.inference_mode()
def conv_inputs(model: nn.Module, example: Tensor) -> dict[str, Tensor]:
    """The input each structured conv of ``model`` sees on ``example`` (one eval forward)."""
    seen: dict[str, Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, _name=name: seen.setdefault(_name, args[0]))
             for name, m in structured_convs(model).items()]
    training = model.training
    try:
        model.eval()
        model(example)
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    return seen


def _fastest_seconds(steps: dict[str, callable], repeats: int) -> dict[str, float]:
    """Fastest wall seconds per step over ``repeats`` rounds, steps interleaved round by round: another job
    on the CPU only adds time, so the fastest round is the steadiest estimate of a layer's own cost."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step()
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


@torch.inference_mode()
def time_conv_layers(model: nn.Module, example: Tensor, repeats: int = 5) -> dict[str, dict]:
    """Per structured conv: the fastest of ``repeats`` timings (ms) of its native form and of the dense conv
    on the input it sees on ``example`` (in that input's memory format), at inference, with its shape and form."""
    rows = {}
    for name, x in conv_inputs(model, example).items():
        conv = structured_convs(model)[name]
        kernel = conv.to_dense_weight().to(x.dtype)
        bias = None if conv.linear.bias is None else conv.linear.bias.to(x.dtype)
        kept = conv.form
        conv.form = "native"
        try:
            seconds = _fastest_seconds({"native": lambda: conv(x),
                                       "dense": lambda: conv.geometry.conv(x, kernel, bias)}, repeats)
            native_form = conv.running_form()
        finally:
            conv.form = kept
        rows[name] = {"type": conv.linear.layer_type, "shape": [conv.out_channels, conv.in_channels,
                                                              *conv.kernel_size], "stride": list(conv.stride),
                      "input": list(x.shape), "native_runs": native_form,
                      "native_ms": round(seconds["native"] * 1e3, 4), "dense_ms": round(seconds["dense"] * 1e3, 4),
                      "speedup": round(seconds["dense"] / seconds["native"], 3)}
    return rows


def choose_conv_forms(model: nn.Module, example: Tensor, report=None, repeats: int = 5,
                      margin: float = 1.0) -> dict[str, dict]:
    """Time every structured conv (:func:`time_conv_layers`) and give each the faster inference form:
    ``dense`` where the dense conv beats the native form by more than ``margin`` (a ratio), else ``native``.
    Each choice is logged and written to the row's ``form``, and to ``report``'s ``conv_form`` (a
    ``CompressionReport``) when given. Returns the timings."""
    rows = time_conv_layers(model, example, repeats)
    convs = structured_convs(model)
    by_name = {row.name: row for row in report.layers} if report is not None else {}
    for name, row in rows.items():
        faster_dense = row["native_ms"] > margin * row["dense_ms"]
        convs[name].form = "dense" if faster_dense else "native"
        row["form"] = "dense" if faster_dense else row["native_runs"]
        if name in by_name:
            by_name[name].conv_form = row["form"]
        if faster_dense:
            log.info("%s: the dense conv (%.3f ms) beats the %s form (%.3f ms); it runs a cached dense kernel at "
                     "inference", name, row["dense_ms"], row["native_runs"], row["native_ms"])
    return rows
