"""The one interface every structured layer implements, and the name -> class registry."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar

import torch
from torch import Tensor, nn

from ..typed_config import check_value
from .config import LayerConfig, OptionError, register_config
from .quant import stored_nbytes

if TYPE_CHECKING:
    from .convforms import ConvGeometry

LAYERS: dict[str, type["StructuredLinear"]] = {}


def register_layer(config: type[LayerConfig]) -> Callable[[type["StructuredLinear"]], type["StructuredLinear"]]:
    """Class decorator: make a layer type, built from ``config`` (its typed config class), available as
    ``layer=<config.layer_type>`` in configs and surgery."""

    def add(cls: type[StructuredLinear]) -> type[StructuredLinear]:
        name = config.layer_type
        if name in LAYERS and LAYERS[name] is not cls:
            raise ValueError(f"layer type {name!r} is registered twice ({LAYERS[name].__name__}, {cls.__name__})")
        register_config(config)
        cls.layer_type, cls.Config = name, config
        LAYERS[name] = cls
        return cls

    return add


def get_layer_class(name: str) -> type["StructuredLinear"]:
    """Look a layer type up by name, with an error that lists the valid names."""
    if name not in LAYERS:
        raise ValueError(
            f"unknown layer type {name!r}; choose one of {sorted(LAYERS)} "
            f"(e.g. layer={next(iter(sorted(LAYERS)), 'lowrank')} on the command line)"
        )
    return LAYERS[name]


def build_layer(name: str, in_features: int, out_features: int, **options) -> "StructuredLinear":
    """A randomly initialised layer of type ``name`` (no pretrained weight)."""
    return get_layer_class(name)(in_features, out_features, **options)


def check_budget(budget: float) -> float:
    """A dense-fraction budget, checked against ``LayerConfig.budget``'s own declaration (for constructors)."""
    check_value("budget", budget, float, LayerConfig.__dataclass_fields__["budget"].metadata["bounds"])
    return float(budget)


def check_dense_weight(weight: Tensor, bias: Tensor | None) -> None:
    """Fail early, with shapes in the message, when a pretrained weight cannot seed a linear layer."""
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"from_dense expects a 2-D weight [out_features, in_features], got {shape}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias shape {tuple(bias.shape)} does not match weight rows {weight.shape[0]}")


@dataclass(frozen=True)
class Calibration:
    """Per-layer data for data-aware settings (see :meth:`StructuredLinear.from_dense`)."""

    gram: Tensor | None = None
    inputs: Tensor | None = None
    kernel_positions: int = 1


class StructuredLinear(nn.Module):
    """``y = W x + b`` where ``W`` (out x in) is stored in a structured, cheaper form.

    Subclasses implement ``from_dense`` (initialise from a pretrained weight at a dense-fraction budget),
    ``forward`` (any leading batch dims), ``to_dense_weight``, ``num_params`` (numbers stored, bias
    included) and ``macs_per_token`` (multiply-adds one input vector needs, bias excluded).
    """

    layer_type: ClassVar[str] = ""
    Config: ClassVar[type[LayerConfig]] = LayerConfig
    conv_column_order: ClassVar[str] = "channel"  # how a conv kernel is flattened for this type, see conv.py
    # floating tensors a save keeps in the layer's own dtype (structure parameters, scales whose rounding would
    # break a guarantee); every other floating tensor of the layer is written in the storage dtype (fp16)
    exact_tensors: ClassVar[tuple[str, ...]] = ()

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Tensor | None = None, config: LayerConfig | None = None, *,
                   gram: Tensor | None = None, inputs: Tensor | None = None,
                   kernel_positions: int = 1) -> "StructuredLinear":
        """The layer that best stands in for the dense ``weight`` [out, in] (and ``bias``) under ``config``
        (this type's ``Config``; None = its defaults). Data-aware settings use calibration data: ``gram``
        (sum of x x^T over the layer's inputs, float64) and ``inputs`` (sample input rows); a conv layer passes
        its ``kernel_positions``."""
        check_dense_weight(weight, bias)
        config = cls.Config() if config is None else config
        if not isinstance(config, cls.Config):
            raise TypeError(f"{cls.__name__}.from_dense takes a {cls.Config.__name__}, got {type(config).__name__}")
        data = Calibration(gram, inputs, kernel_positions)
        for needed in config.calibration_needed():
            if getattr(data, needed) is None:
                raise OptionError("calibration_batches", 0, f"layer type {cls.layer_type} with these options "
                                  f"needs calibration {needed}", "set layer.calibration_batches > 0 (or pass "
                                  f"{needed}= to from_dense / calibration= to compress_)")
        return cls.initialize(weight.detach(), None if bias is None else bias.detach(), config, data)

    @classmethod
    def initialize(cls, weight: Tensor, bias: Tensor | None, config: LayerConfig,
                   data: "Calibration") -> "StructuredLinear":
        """The type's own decomposition behind :meth:`from_dense` (inputs already checked)."""
        raise NotImplementedError

    @classmethod
    def empty(cls, in_features: int, out_features: int, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None, **options) -> "StructuredLinear":
        """The layer with uninitialised storage: built on the meta device, so no random init (which can cost
        as much as the decomposition) runs, then materialised. ``from_dense`` must fill every tensor."""
        with torch.device("meta"):
            layer = cls(in_features, out_features, **options)
        layer = layer.to_empty(device=device or "cpu")
        return layer if dtype is None else layer.to(dtype)

    def to_dense_weight(self) -> Tensor:
        raise NotImplementedError

    def num_params(self) -> int:
        raise NotImplementedError

    def conv_forward(self, x: Tensor, geometry: "ConvGeometry") -> Tensor | None:
        """This map run as the conv ``geometry`` describes, on an NCHW (or channels-last) feature map, through
        native (grouped) conv kernels instead of ``F.unfold`` (see :mod:`.convforms`); None where the type, or
        this layer's current state, has no such form (the caller then runs the unfold reference)."""
        return None

    def macs_per_token(self) -> int:
        raise NotImplementedError

    def storage_bytes(self, float_bytes: int = 2) -> int:
        """Bytes this layer's state takes in a saved file: ternary tensors packed, floating tensors at
        ``float_bytes`` per entry (the storage dtype: 2 for the default fp16 save), ``exact_tensors`` as held."""
        return sum(tensor.numel() * float_bytes if tensor.is_floating_point() and name not in self.exact_tensors
                   else stored_nbytes(tensor) for name, tensor in self.state_dict().items())

    def config(self) -> dict:
        """Constructor keyword arguments (besides in/out features) that rebuild this layer's structure, so a
        saved state dict can be loaded into ``type(self)(in_features, out_features, **config())``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement config(), which saving needs")

    def structural_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters that describe the structure (not the values), e.g. Gaudi widths; they get their
        own optimizer group. Empty for most types."""
        return {}

    def bias_params(self) -> int:
        return 0 if self.bias is None else self.bias.numel()

    def _copy_bias(self, bias: Tensor | None) -> None:
        if bias is not None and self.bias is not None:
            with torch.no_grad():
                self.bias.copy_(bias.to(self.bias.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
