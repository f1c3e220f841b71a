"""Model surgery: swap ``nn.Linear`` / HF ``Conv1D`` / ``nn.Conv2d`` for structured layers, torchao style.

``compress_(model, "lowrank", 0.25, include=["blocks.*"])`` replaces every matching layer in place,
initialises it from the layer's own (pretrained) weight and returns a :class:`CompressionReport`.
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .layers import StructuredConv2d, get_layer_class
from .layers.config import LayerConfig, config_class
from .typed_config import OptionError
from .layers.conv import kernel_as_matrix
from .modeltree import FilterFn, dense_view, replace_child, select_layers
from .planner import AutoConfig, layer_from_dense, plan_layers

log = logging.getLogger(__name__)
OUTPUT_ERROR_ROWS = 512  # calibration rows the report's output error is measured on


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
    budget_of: str = "params"  # what budget counted: params, macs, bytes or none (see LayerConfig.budget_of)
    output_error: float | None = None  # ||X (W_hat - W)^T|| / ||X W^T + b|| on calibration inputs, where given
    conv_form: str | None = None  # a conv's form: native, dense (cached kernel at inference) or unfold


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
        """The report :meth:`to_dict` wrote (as stored in checkpoints; rows of older ones say flops for MACs)."""
        renamed = {"flops_before": "macs_before", "flops_after": "macs_after"}
        rows = [LayerReport(**{renamed.get(k, k): v for k, v in row.items()}) for row in data["layers"]]
        return cls(rows, data["model_params_before"],
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


def _first_match(name: str, table: Mapping[str, object]):
    return next((value for pattern, value in table.items() if fnmatch.fnmatchcase(name, pattern)), None)


def config_table(layer: str | LayerConfig | Mapping[str, str | LayerConfig],
                 budget: float | Mapping[str, float] | None = None,
                 options: Mapping | None = None) -> Callable[[str], LayerConfig | None]:
    """Per layer name, the typed config that ``compress_``'s arguments give it (None: leave the layer alone).
    Every config is built -- and so checked -- here, before any layer changes."""
    several_types = isinstance(layer, Mapping)
    layer_table = dict(layer) if several_types else {"*": layer}
    budget_table = dict(budget) if isinstance(budget, Mapping) else {"*": budget}
    if any(isinstance(spec, LayerConfig) for spec in layer_table.values()) and (budget is not None or options):
        raise ValueError("compress_ got a config object and budget=/options=: set them in the config instead, "
                         "e.g. LowRankConfig(budget=0.25, init='whiten')")
    built: dict[tuple, LayerConfig] = {}

    def build(spec: str | LayerConfig, layer_budget: float | None) -> LayerConfig:
        if isinstance(spec, LayerConfig):
            return spec
        if (spec, layer_budget) not in built:
            own = (options or {}).get(spec) if several_types else options
            built[spec, layer_budget] = config_class(spec).from_options(own, layer_budget)
        return built[spec, layer_budget]

    for spec in layer_table.values():
        for layer_budget in budget_table.values():
            build(spec, layer_budget)

    def config_for(name: str) -> LayerConfig | None:
        spec = _first_match(name, layer_table)
        return None if spec is None else build(spec, _first_match(name, budget_table))

    return config_for


def replace_layer(model: nn.Module, name: str, config: LayerConfig,
                  calibration: Mapping[str, Tensor] | None = None) -> LayerReport:
    """Replace the dense layer ``name`` of ``model`` by the structured layer ``config`` makes from its weight."""
    module = model.get_submodule(name)
    kind, weight, bias = dense_view(module)
    cls = get_layer_class(config.layer_type)
    weight = (kernel_as_matrix(module.weight, cls.conv_column_order) if kind == "conv2d" else weight).detach()
    # a conv's kernel positions matter to types that treat them apart (Gaudi's segments="kernel")
    positions = module.kernel_size[0] * module.kernel_size[1] if kind == "conv2d" else 1
    try:
        new_linear = layer_from_dense(config, weight, None if bias is None else bias.detach(), calibration,
                                      positions)
    except OptionError as err:  # a setting that cannot fit this layer's shape: say which layer
        raise OptionError(err.option, err.value, f"{err.problem} (layer {name})", err.fix) from None
    new_linear.train(module.training)
    approximation = new_linear.to_dense_weight().float()
    error = (approximation - weight.float()).norm() / weight.float().norm().clamp(min=1e-30)
    output_error = None
    if calibration and calibration.get("inputs") is not None and (kind != "conv2d" or cls.conv_column_order
                                                                   == "channel"):
        sample = evenly_spaced_rows(calibration["inputs"], OUTPUT_ERROR_ROWS).float()
        reference = torch.nn.functional.linear(sample, weight.float(), None if bias is None else bias.float())
        output_error = ((sample @ (approximation - weight.float()).T).norm()
                        / reference.norm().clamp(min=1e-30)).item()
    new_module = StructuredConv2d.from_conv(module, new_linear) if kind == "conv2d" else new_linear
    replace_child(model, name, new_module)
    out_features, in_features = weight.shape
    return LayerReport(
        name=name, kind=kind, layer_type=config.layer_type, out_features=out_features, in_features=in_features,
        budget=config.budget, budget_of=config.budget_of,
        params_before=weight.numel() + (0 if bias is None else bias.numel()), params_after=new_linear.num_params(),
        macs_before=weight.numel(), macs_after=new_linear.macs_per_token(), rel_error=error.item(),
        options=config.options(), output_error=output_error,
        conv_form=new_module.running_form() if kind == "conv2d" else None)


@torch.no_grad()
def compress_(model: nn.Module, layer: str | LayerConfig | Mapping[str, str | LayerConfig],
              budget: float | Mapping[str, float] | None = None,
              include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None,
              filter_fn: FilterFn | None = None, options: Mapping | None = None,
              calibration: Mapping[str, Mapping[str, Tensor]] | None = None) -> CompressionReport:
    """Replace matching layers of ``model`` in place by structured layers initialised from their weights.

    layer: a typed config (``LowRankConfig(budget=0.25)``), a type name (``"lowrank"``), or an ordered dict
        of fnmatch patterns -> either (first match wins).
    budget, options: with type names only -- the dense fraction (or patterns -> fraction) and the type's
        options (with a dict ``layer``, keyed by type name); they build that type's config.
    calibration: per layer name, data-aware inputs such as ``{"gram": X X^T}`` (see ``collect_input_gram``).
    ``AutoConfig`` (``"auto"``) plans a codec per layer from the calibration data instead (``planner.py``).
    """
    config_for = config_table(layer, budget, options)
    selected = select_layers(model, include, exclude, filter_fn)
    planned = {name: config_for(name) for name in selected}
    report = CompressionReport(model_params_before=sum(p.numel() for p in model.parameters()))
    notes: dict[str, dict] = {}
    autos = {id(c): c for c in planned.values() if isinstance(c, AutoConfig)}  # configs are not hashable
    for config in autos.values():
        names = [name for name, c in planned.items() if c is config]
        auto_plan = plan_layers(model, config, calibration, include=names)
        planned.update({name: auto_plan.get(name, (None, None))[0] for name in names})
        notes.update({name: note for name, (_, note) in auto_plan.items()})
    for name, config in planned.items():
        if config is None:
            continue
        row = replace_layer(model, name, config, (calibration or {}).get(name))
        row.options.update(notes.get(name, {}))
        report.layers.append(row)
        log.info("replaced %s (%s %dx%d) by %s: params %d -> %d, weight error %.4f%s", name, row.kind,
                 row.out_features, row.in_features, row.layer_type, row.params_before, row.params_after,
                 row.rel_error, "" if row.output_error is None else f", output error {row.output_error:.4f}")
    if not report.layers and not autos:  # an auto plan may keep every layer
        raise ValueError("no layer was replaced: the include/exclude patterns and layer dict select nothing")
    # numbers stored, not nn.Parameters: quantized / encoded types keep theirs in buffers
    report.model_params_after = report.model_params_before - report.params_before + report.params_after
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
                x = torch.nn.functional.unfold(x, mod.kernel_size, mod.dilation, mod.padding,
                                               mod.stride).transpose(1, 2)
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
