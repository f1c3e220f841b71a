"""Model surgery: swap ``nn.Linear`` / HF ``Conv1D`` / ``nn.Conv2d`` for structured layers, torchao style.

``compress_(model, "lowrank", 0.25, include=["blocks.*"])`` replaces every matching layer in place,
initialises it from the layer's own (pretrained) weight and returns a :class:`CompressionReport`.
"""
from __future__ import annotations

import fnmatch
import inspect
import logging
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .layers import StructuredConv2d, StructuredLinear, check_budget, get_layer_class
from .layers.conv import kernel_as_matrix
from .modeltree import FilterFn, dense_view, replace_child, select_layers

log = logging.getLogger(__name__)



@dataclass
class LayerReport:
    """What one replacement did: sizes and MACs per token (or per output position) before and after."""

    name: str
    kind: str
    layer_type: str
    out_features: int
    in_features: int
    budget: float
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    rel_error: float
    options: dict = field(default_factory=dict)


@dataclass
class CompressionReport:
    """Per-layer rows plus totals; ``model_params_*`` count the whole model."""

    layers: list[LayerReport] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.layers)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.layers)

    @property
    def macs_before(self) -> int:
        return sum(r.macs_before for r in self.layers)

    @property
    def macs_after(self) -> int:
        return sum(r.macs_after for r in self.layers)

    def summary(self) -> dict:
        return {
            "replaced_layers": len(self.layers),
            "replaced_params_before": self.params_before,
            "replaced_params_after": self.params_after,
            "replaced_macs_per_token_before": self.macs_before,
            "replaced_macs_per_token_after": self.macs_after,
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
        }

    def to_dict(self) -> dict:
        return {**self.summary(), "layers": [asdict(r) for r in self.layers]}

    @classmethod
    def from_dict(cls, data: dict) -> "CompressionReport":
        """The report :meth:`to_dict` wrote (as stored in checkpoints)."""
        return cls([LayerReport(**row) for row in data["layers"]], data["model_params_before"],
                   data["model_params_after"])

    def format_table(self) -> str:
        """A plain-text table, one row per replaced layer, then the totals."""
        head = f"{'layer':<40} {'type':<8} {'shape':>11} {'params':>19} {'MACs/token':>19} {'rel.err':>8}"
        rows = [head, "-" * len(head)]
        for r in self.layers:
            rows.append(
                f"{r.name[-40:]:<40} {r.layer_type:<8} {f'{r.out_features}x{r.in_features}':>11} "
                f"{f'{r.params_before}->{r.params_after}':>19} {f'{r.macs_before}->{r.macs_after}':>19} "
                f"{r.rel_error:8.4f}"
            )
        rows.append("-" * len(head))
        rows.append(
            f"{'replaced total':<40} {'':<8} {'':>11} {f'{self.params_before}->{self.params_after}':>19} "
            f"{f'{self.macs_before}->{self.macs_after}':>19}"
        )
        rows.append(f"model parameters: {self.model_params_before} -> {self.model_params_after}")
        return "\n".join(rows)


def _first_match(name: str, table: Mapping[str, object], what: str):
    for pattern, value in table.items():
        if fnmatch.fnmatchcase(name, pattern):
            return value
    raise ValueError(f"no {what} given for layer {name!r}: add a matching pattern (e.g. '*') to the {what} dict")


def check_options(cls: type[StructuredLinear], options: Mapping) -> None:
    """Fail with the list of valid names when ``options`` holds a keyword ``cls.from_dense`` does not take."""
    accepted = inspect.signature(cls.from_dense).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    unknown = [k for k in options if k not in accepted and not takes_any]
    if unknown:
        valid = [k for k in accepted if k not in ("cls", "weight", "bias", "budget")]
        raise ValueError(f"layer type {cls.layer_type!r} has no option(s) {unknown}; valid options: {valid}")


def _call_from_dense(cls, weight: Tensor, bias: Tensor | None, budget: float, options: dict,
                     calibration: Mapping[str, Tensor] | None) -> StructuredLinear:
    check_options(cls, options)
    accepted = inspect.signature(cls.from_dense).parameters
    extra = {k: v for k, v in (calibration or {}).items() if k in accepted and k not in options}
    return cls.from_dense(weight, bias, budget, **options, **extra)


def _options_for(layer_type: str, options: Mapping | None, several_types: bool) -> dict:
    if not options:
        return {}
    if several_types:
        return dict(options.get(layer_type, {}) or {})
    return dict(options)


@torch.no_grad()
def compress_(model: nn.Module, layer: str | Mapping[str, str], budget: float | Mapping[str, float] = 1.0,
              include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None,
              filter_fn: FilterFn | None = None, options: Mapping | None = None,
              calibration: Mapping[str, Mapping[str, Tensor]] | None = None) -> CompressionReport:
    """Replace matching layers of ``model`` in place by structured layers initialised from their weights.

    layer: a type name (``"lowrank"``) or an ordered dict of fnmatch patterns -> type names.
    budget: a dense fraction in (0, 1], or an ordered dict of patterns -> budget (first match wins).
    options: keyword options for ``from_dense``; with a dict ``layer``, keyed by type name.
    calibration: per layer name, data-aware inputs such as ``{"gram": X X^T}`` (see ``collect_input_gram``).
    ``layer="auto"`` plans a codec per layer from the calibration data instead (``src/structured_compress/layers/auto.py``; its
    settings -- choices, target_bytes / target_ratio / max_error -- come in ``options``).
    """
    if isinstance(layer, str) and layer == "auto":
        from .layers.auto import compress_auto_

        return compress_auto_(model, calibration, include=include, exclude=exclude, filter_fn=filter_fn,
                              **dict(options or {}))
    several_types = isinstance(layer, Mapping)
    layer_table = dict(layer) if several_types else {"*": layer}
    budget_table = dict(budget) if isinstance(budget, Mapping) else {"*": budget}
    for type_name in layer_table.values():
        get_layer_class(type_name)
    for value in budget_table.values():
        check_budget(value)

    report = CompressionReport(model_params_before=sum(p.numel() for p in model.parameters()))
    for name, module in select_layers(model, include, exclude, filter_fn).items():
        if not any(fnmatch.fnmatchcase(name, p) for p in layer_table):
            continue
        type_name = _first_match(name, layer_table, "layer type")
        layer_budget = _first_match(name, budget_table, "budget")
        cls = get_layer_class(type_name)
        kind, weight, bias = dense_view(module)
        weight = kernel_as_matrix(module.weight, cls.conv_column_order) if kind == "conv2d" else weight
        weight = weight.detach()
        layer_options = _options_for(type_name, options, several_types)
        extras = dict((calibration or {}).get(name) or {})
        if kind == "conv2d":  # types that treat kernel positions apart (Gaudi's segments="kernel") take this
            extras["kernel_positions"] = module.kernel_size[0] * module.kernel_size[1]
        new_linear = _call_from_dense(cls, weight, None if bias is None else bias.detach(), layer_budget,
                                      layer_options, extras)
        new_linear.train(module.training)
        rel_error = ((new_linear.to_dense_weight().float() - weight.float()).norm() / weight.float().norm().clamp(min=1e-30)).item()
        new = StructuredConv2d.from_conv(module, new_linear) if kind == "conv2d" else new_linear
        replace_child(model, name, new)
        out_features, in_features = weight.shape
        report.layers.append(LayerReport(
            name=name, kind=kind, layer_type=type_name, out_features=out_features, in_features=in_features,
            budget=layer_budget, params_before=weight.numel() + (0 if bias is None else bias.numel()),
            params_after=new_linear.num_params(), macs_before=weight.numel(),
            macs_after=new_linear.macs_per_token(), rel_error=rel_error, options=layer_options,
        ))
        log.debug("replaced %s (%s %dx%d) by %s", name, kind, out_features, in_features, type_name)
    if not report.layers:
        raise ValueError("no layer was replaced: the include/exclude patterns and layer dict select nothing")
    # numbers stored, not nn.Parameters: quantized / encoded types keep theirs in buffers
    report.model_params_after = report.model_params_before - report.params_before + report.params_after
    from .io.source import guard_save_pretrained  # deferred: structured_compress.io imports this module

    guard_save_pretrained(model)  # its plain save_pretrained would write packed layers transformers cannot read
    return report


@torch.no_grad()
def collect_input_gram(model: nn.Module, batches: Iterable, names: Iterable[str],
                       forward: Callable[[nn.Module, object], object] | None = None,
                       max_inputs: int = 4096) -> dict[str, dict[str, Tensor]]:
    """Run calibration ``batches`` through ``model`` and return, per layer name, ``{"gram": sum x x^T}``
    (float64, over every input vector the layer sees) and ``{"inputs": up to max_inputs of those vectors,
    spread evenly over all batches}``: what data-aware SVD (``gram``) and the error-bounded rank search
    (``inputs``) need."""
    forward = forward or (lambda m, batch: m(batch))
    grams: dict[str, Tensor] = {}
    samples: dict[str, list[Tensor]] = {}
    hooks = []
    modules = dict(model.named_modules())
    for name in names:
        module = modules[name]
        kind = dense_view(module)[0]

        def hook(mod, args, _name=name, _kind=kind):
            x = args[0]
            if _kind == "conv2d":
                x = torch.nn.functional.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride).transpose(1, 2)
            x = x.reshape(-1, x.shape[-1])
            grams[_name] = grams.get(_name, 0) + x.double().T @ x.double()
            samples.setdefault(_name, []).append(evenly_spaced_rows(x.detach(), max_inputs).clone())

        hooks.append(module.register_forward_pre_hook(hook))
    try:
        for batch in batches:
            forward(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return {name: {"gram": gram, "inputs": evenly_spaced_rows(torch.cat(samples[name]), max_inputs)}
            for name, gram in grams.items()}


def evenly_spaced_rows(rows: Tensor, count: int) -> Tensor:
    """At most ``count`` rows spread evenly over ``rows`` (deterministic), so a conv's sample covers every
    image and position and a batch's sample covers every sequence, not only the first ones."""
    if len(rows) <= count:
        return rows
    return rows[torch.linspace(0, len(rows) - 1, count, device=rows.device).long()]


def collect_output_embedding_gram(model: nn.Module, batches: Iterable,
                                  forward: Callable[[nn.Module, object], object] | None = None) -> dict[str, Tensor]:
    """``{state-dict key of the LM head weight: Gram matrix of its inputs}`` over ``batches``: what
    ``save_compressed(..., storage={"embeddings_rounding": "gptq"}, calibration=...)`` rounds the output
    embedding (tied or not) against, so it keeps the logits rather than each weight."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__} has no nn.Linear output embedding (get_output_embeddings) to "
                         "calibrate: GPTQ embedding rounding is for LM heads")
    name = next(n for n, module in model.named_modules() if module is head)
    gram = collect_input_gram(model, batches, [name], forward=forward, max_inputs=1)[name]["gram"]
    return {f"{name}.weight": gram}
