"""Gaudi-GBLR: a sum of rank-t blocks whose row and column intervals are learned (arXiv 2310.18882).

Component ``i`` is ``diag(g_out_i) U_i V_i diag(g_in_i)``: ``U_i`` (m x t) and ``V_i`` (t x n) are plain
factors, and ``g_in_i``, ``g_out_i`` are soft 0/1 interval masks (:mod:`.mask`), each given by a width and a
location in units of the axis length. Widths and locations are ``2 x K`` tensors with rows ``[input; output]``.
"""
from __future__ import annotations

import logging
import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import Calibration, StructuredLinear, check_budget, register_layer
from ..config import OptionError
from ..lowrank import rank_for_budget
from .config import COMPUTE_MODES, GaudiConfig
from .conv import gaudi_conv, masked_factor_conv, prefer_sliced
from .compact import MAX_COMPACT_FRACTION, MAX_GROUPS, CompactPlan, build_plan, compact_forward
from .mask import MASK_THRESHOLD, gaudi_mask, snap_to_grid
from .search import find_structure, kept_components, whole_layer_report

log = logging.getLogger(__name__)

SMALLEST_COMPONENT_MACS = 4  # a live component is more than one element wide on both axes: 2 rows + 2 columns


def check_fits_one_component(budget: float, out_features: int, in_features: int) -> None:
    """Raise :class:`OptionError` when ``budget`` of an ``out x in`` block cannot hold one live component."""
    if min(out_features, in_features) < 2 or budget * out_features * in_features < SMALLEST_COMPONENT_MACS:
        smallest = SMALLEST_COMPONENT_MACS / (out_features * in_features)
        fix = ("exclude the layer with layer.exclude" if min(out_features, in_features) < 2 or smallest > 1 else
               f"raise layer.budget to at least {smallest:.2g}, or exclude the layer with layer.exclude")
        raise OptionError("budget", budget, f"keeps less than one 2x2 component ({SMALLEST_COMPONENT_MACS} MACs) "
                          f"of a {out_features}x{in_features} block", fix)


@register_layer(GaudiConfig)
class GaudiGBLRLinear(StructuredLinear):
    """``y = W x + b`` with ``W = sum_i diag(g_out_i) U_i V_i diag(g_in_i)`` (see module docstring).

    ``K`` components of rank ``t``: ``t = rank_per_component`` (a float is a fraction of ``min(m, n)``);
    ``K = floor(total_rank_ratio min(m, n)) // t`` if given, else ``min(num_components, min(m, n) // t)``,
    else ``min(m, n) // t``. ``sigma=None`` drops the Gaussian factor. Widths and locations are snapped to
    the grid ``1/N`` (straight-through) unless ``no_ste`` in training; in eval, widths of one element or less
    are zeroed and mask entries below 1e-3 dropped. They stay float32 when the module is cast to bf16/fp16.
    ``width_init``: a float, ``'unif'``, ``'splr[X]'`` or ``'lr[X]'``; default ``'splr'``, or with ``budget``
    the low-rank pattern with as many full components as the dense fraction allows.
    ``segments``: the reference's per-kernel-position conv variant -- the input axis is ``segments`` equal
    blocks, each with its own ``K`` components confined to it (``[W_1 | ... | W_S]``, one Gaudi-GBLR matrix
    per block); ``n`` above is then the block width, and ``num_components`` counts per block.
    ``compute_mode``: ``'dense'`` builds ``W`` from the masks (the reference path), ``'lr'`` applies the
    masked factors in turn, ``'compact'`` runs only each component's intervals (:mod:`.compact`) when
    the masks are exact intervals -- no Gaussian, and eval mode or frozen widths/locations -- and the dense
    path otherwise; ``'auto'`` (default) is ``'compact'`` when its plan is cheap, else ``'dense'``.
    """

    exact_tensors = ("widths", "locations", "sigma")  # fp16 would move interval edges by whole columns

    conv_column_order = "kernel"  # the reference's conv flattening: kernel position first

    def __init__(self, in_features: int, out_features: int, rank_per_component: int | float = 1,
                 num_components: int | None = None, total_rank_ratio: float | None = None, bias: bool = True,
                 sigma: float | None = 100.0, compute_mode: str = "auto", custom_grad: bool = False,
                 no_ste: bool = False, width_init: str | float | None = None, location_init: str | float = "unif",
                 budget: float | None = None, segments: int = 1):
        super().__init__(in_features, out_features, bias)
        if segments < 1 or in_features % segments:
            raise ValueError(f"segments must divide in_features={in_features} (e.g. k_h k_w kernel positions of a "
                             f"conv), got {segments}")
        self.segments = int(segments)
        block = in_features // segments
        smaller = min(block, out_features)
        if isinstance(rank_per_component, float):
            rank_per_component = math.floor(rank_per_component * smaller)
        if not 1 <= rank_per_component <= smaller:
            raise ValueError(f"rank_per_component must give a rank in [1, {smaller}], got {rank_per_component}")
        if total_rank_ratio is not None:
            num_components = math.floor(total_rank_ratio * smaller) // rank_per_component
        else:
            num_components = min(num_components or smaller, smaller // rank_per_component)
        if num_components < 1:
            raise ValueError(f"need at least one component; got {num_components} for a "
                             f"{out_features}x{block} layer")
        if compute_mode not in COMPUTE_MODES:
            raise ValueError(f"compute_mode must be one of {COMPUTE_MODES}, got {compute_mode!r}")
        self.rank_per_component = int(rank_per_component)
        self.components_per_segment = int(num_components)
        self.num_components = int(num_components) * self.segments
        self.compute_mode = compute_mode
        self._plan: CompactPlan | None = None
        self._plan_key: tuple | None = None
        self.custom_grad = custom_grad
        self.no_ste = no_ste
        self.no_gaussian = sigma is None
        self.register_buffer("sigma", torch.tensor(100.0 if sigma is None else float(sigma)))
        k, t = self.num_components, self.rank_per_component
        self.in_factors = nn.Parameter(torch.empty(k, t, block))  # V_i, within its segment
        self.out_factors = nn.Parameter(torch.empty(k, out_features, t))  # U_i
        structure_dtype = torch.promote_types(torch.get_default_dtype(), torch.float32)  # >= float32, see _apply
        self.widths = nn.Parameter(torch.empty(2, k, dtype=structure_dtype))  # rows [input; output], axis fractions
        self.locations = nn.Parameter(torch.empty(2, k, dtype=structure_dtype))
        if width_init is None and budget is not None:
            per_segment = self.components_per_segment
            full = min(per_segment, rank_for_budget(check_budget(budget), out_features, block) // t)
            width_init = f"lr{full / per_segment}"
        self.width_init = "splr" if width_init is None else width_init
        self.location_init = location_init
        self.reset_parameters()

    @property
    def axis_sizes(self) -> tuple[int, int]:
        """Lengths of the input (one segment's) and output axes, in the row order of ``widths``/``locations``."""
        return self.in_features // self.segments, self.out_features

    def reset_parameters(self) -> None:
        """Factors uniform(+-1/sqrt(fan_in)) with fan_in = their last dim; bias like ``nn.Linear``."""
        with torch.no_grad():
            bound = 1 / math.sqrt(self.in_features)
            self.in_factors.uniform_(-1 / math.sqrt(self.axis_sizes[0]), 1 / math.sqrt(self.axis_sizes[0]))
            self.out_factors.uniform_(-1 / math.sqrt(self.rank_per_component), 1 / math.sqrt(self.rank_per_component))
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)
            self.widths.copy_(self._initial_widths(self.width_init))
            self.locations.copy_(self._initial_locations(self.location_init))

    def _storage_ratio(self) -> float:
        """Factor storage relative to dense, ``K t (m + n) / (m n)`` per segment."""
        n, m = self.axis_sizes
        return self.components_per_segment * self.rank_per_component * (m + n) / (m * n)

    def _initial_widths(self, scheme: str | float) -> Tensor:
        k = self.num_components
        if isinstance(scheme, numbers.Real) and not isinstance(scheme, bool):
            return torch.full((2, k), float(scheme))
        if scheme == "unif":
            return torch.rand(2, k)
        for prefix in ("splr", "lr"):
            if isinstance(scheme, str) and scheme.startswith(prefix):
                tail = scheme[len(prefix):]
                ratio = float(tail) if tail else 1 / self._storage_ratio()
                break
        else:
            raise ValueError(f"unknown width_init {scheme!r}; use a float, 'unif', 'splr[X]' or 'lr[X]'")
        k = self.components_per_segment  # the pattern repeats in every segment
        widths = torch.ones(2, k)
        if prefix == "splr":  # half the share at full width, the rest equal so the mean width is `ratio`
            full = min(k, math.floor(k * ratio / 2))
            if full < k:
                widths[:, full:] = min(1.0, (ratio / 2) / (1 - ratio / 2))
        else:  # exact low rank: `full` components everywhere, the rest one element on one axis only
            full = min(k, math.floor(k * ratio + 1e-9))
            widths[:, full:] = 0.0
            widths[0, full::2] = 1 / self.axis_sizes[0]
            widths[1, full + 1::2] = 1 / self.out_features
        return widths.repeat(1, self.segments)

    def _initial_locations(self, scheme: str | float) -> Tensor:
        k = self.num_components
        if isinstance(scheme, numbers.Real) and not isinstance(scheme, bool):
            return torch.full((2, k), float(scheme))
        if scheme == "linspace":
            per_segment = self.components_per_segment
            return (torch.arange(per_segment) / per_segment).repeat(self.segments).expand(2, k).clone()
        if scheme == "unif":
            return torch.rand(2, k)
        raise ValueError(f"unknown location_init {scheme!r}; use a float, 'linspace' or 'unif'")

    def structural_parameters(self) -> dict[str, nn.Parameter]:
        return {"widths": self.widths, "locations": self.locations}

    @torch.no_grad()
    def project_structure_(self, min_widths=(0.0, 0.0), max_widths=(1.0, 1.0)) -> None:
        """Clamp widths per axis to ``[min, max]`` and wrap locations into ``[0, 1)``."""
        for axis in range(2):
            self.widths[axis].clamp_(min_widths[axis], max_widths[axis])
        wrapped = self.locations - self.locations.floor()
        self.locations.copy_(torch.where(wrapped >= 1, torch.zeros_like(wrapped), wrapped))  # -tiny wraps to 1.0

    def _snapped(self, param: Tensor, axis: int) -> Tensor:
        """Row ``axis`` of a structural parameter in float64, on the grid ``1/N`` unless training with ``no_ste``."""
        value = param[axis].double()
        return value if self.training and self.no_ste else snap_to_grid(value, self.axis_sizes[axis])

    def effective_width(self, axis: int) -> Tensor:
        """The widths the forward uses: snapped, and in eval hard-shrunk (one element or less -> 0)."""
        width = self._snapped(self.widths, axis)
        return width if self.training else width * (width.abs() > 1.0 / self.axis_sizes[axis])

    def component_masks(self) -> tuple[Tensor, Tensor]:
        """Float64 ``(input masks [K, n], output masks [K, m])`` as the forward uses them in this mode."""
        sigma = None if self.no_gaussian else self.sigma
        masks = []
        for axis, size in enumerate(self.axis_sizes):
            mask = gaudi_mask(self.effective_width(axis), self._snapped(self.locations, axis), size, sigma,
                              custom_grad=self.custom_grad)
            masks.append(mask if self.training else mask * (mask.abs() >= MASK_THRESHOLD))
        return masks[0], masks[1]

    def masked_factors(self) -> tuple[Tensor, Tensor]:
        """``W1 = stack_i(V_i g_in_i)`` of shape (K t, n) and ``W2 = concat_i(U_i g_out_i)`` of shape (m, K t)."""
        mask_in, mask_out = self.component_masks()
        dtype = self.in_factors.dtype
        inner = self.num_components * self.rank_per_component
        in_weight = self.in_factors * mask_in.to(dtype)[:, None, :]
        if self.segments > 1:  # segment s's components read columns [s n_s, (s + 1) n_s) only
            blocks = in_weight.reshape(self.segments, -1, self.axis_sizes[0])
            eye = torch.eye(self.segments, dtype=dtype, device=blocks.device)
            in_weight = torch.einsum("skj,su->skuj", blocks, eye)
        in_weight = in_weight.reshape(inner, self.in_features)
        out_weight = (self.out_factors * mask_out.to(dtype)[:, :, None]).transpose(0, 1)
        out_weight = out_weight.reshape(self.out_features, inner)
        return in_weight, out_weight

    def to_dense_weight(self) -> Tensor:
        in_weight, out_weight = self.masked_factors()
        return out_weight @ in_weight

    def compact_plan(self) -> CompactPlan | None:
        """The interval grouping of :mod:`.compact` when the masks are exact intervals -- no Gaussian, and
        eval mode or widths/locations frozen on the grid in training -- else None. Cached per structure."""
        if not self.no_gaussian or (self.training and (self.no_ste or self.widths.requires_grad
                                                        or self.locations.requires_grad)):
            return None
        key = (self.training, self.widths._version, self.locations._version, self.widths.data_ptr(),
               self.locations.data_ptr(), self.in_factors.device)
        if key != self._plan_key:
            self._plan, self._plan_key = build_plan(self), key
        return self._plan

    def _chosen_plan(self) -> CompactPlan | None:
        """The plan when this forward runs compact: always if eligible in ``compact`` mode; in ``auto`` mode
        when it is also cheap (few distinct intervals, MACs well under dense)."""
        if self.compute_mode not in ("compact", "auto"):
            return None
        plan = self.compact_plan()
        if plan is None or self.compute_mode == "compact":
            return plan
        cheap = len(plan.inputs) + len(plan.outputs) <= MAX_GROUPS \
            and plan.macs <= MAX_COMPACT_FRACTION * self.in_features * self.out_features
        return plan if cheap else None

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with last dim {self.in_features}, got shape {tuple(x.shape)}")
        plan = self._chosen_plan()
        if plan is not None:
            return compact_forward(self, plan, x)
        in_weight, out_weight = self.masked_factors()
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.compute_mode == "lr":
            return F.linear(F.linear(x, in_weight.to(x.dtype)), out_weight.to(x.dtype), bias)
        return F.linear(x, (out_weight @ in_weight).to(x.dtype), bias)

    def conv_forward(self, x: Tensor, geometry) -> Tensor | None:
        """Convs (:mod:`.conv`): the compact interval form over channel slices when the masks are exact
        intervals (see :meth:`compact_plan`) and narrow enough to pay, else the masked factors as a k x k conv
        into ``K t`` channels and a 1 x 1 conv (valid in every state)."""
        plan = self.compact_plan()
        if prefer_sliced(self, plan, geometry):
            return gaudi_conv(self, plan, x, geometry)
        return masked_factor_conv(self, x, geometry)

    def num_params(self) -> int:
        """Stored numbers: factors ``K t (m + n)``, widths and locations ``4 K``, and the bias (the factors
        stay full length; only an export step would trim them to the intervals)."""
        return self.num_components * (self.rank_per_component * sum(self.axis_sizes) + 4) + self.bias_params()

    @torch.no_grad()
    def macs_per_token(self) -> int:
        """Effective MACs ``sum_i min(t (u_i + v_i), u_i v_i)``: ``u_i``/``v_i`` count mask entries above
        1e-3 of components wider than one element on both axes (current train/eval behaviour)."""
        active = (self.effective_width(0) > 1.0 / self.axis_sizes[0]) \
            & (self.effective_width(1) > 1.0 / self.out_features)
        mask_in, mask_out = self.component_masks()
        cols = (mask_in > MASK_THRESHOLD).sum(-1) * active
        rows = (mask_out > MASK_THRESHOLD).sum(-1) * active
        return int(torch.minimum(self.rank_per_component * (rows + cols), rows * cols).sum())

    def config(self) -> dict:
        """Options that rebuild this layer's state layout; widths, locations and sigma come from the state dict."""
        return {"rank_per_component": self.rank_per_component, "num_components": self.components_per_segment,
                "segments": self.segments,
                "bias": self.bias is not None, "sigma": None if self.no_gaussian else float(self.sigma),
                "compute_mode": self.compute_mode, "custom_grad": self.custom_grad, "no_ste": self.no_ste,
                "width_init": 1.0, "location_init": 0.0}

    def _apply(self, fn, recurse: bool = True):
        """Keep widths/locations at float32 when cast to a 16-bit dtype: the ``1/N`` grid needs the bits."""
        saved = {name: p.detach().clone() for name, p in self.structural_parameters().items()}
        super()._apply(fn, recurse)
        for name, value in saved.items():
            param = getattr(self, name)
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = value.to(device=param.device)
        return self

    @classmethod
    def initialize(cls, weight: Tensor, bias: Tensor | None, config: GaudiConfig,
                   data: Calibration) -> "GaudiGBLRLinear":
        """Fit rank-1 components to ``weight`` within ``config.budget`` of its dense MACs with the structure search
        of :mod:`.search`, on ``weight``'s device; with ``segments``, each block of columns on its own (the
        per-kernel-position conv variant; ``"kernel"`` takes ``data.kernel_positions``, ``k_h k_w`` for a conv,
        1 for a linear layer). With ``sigma`` null the layer's ``macs_per_token`` is at most ``budget m n``.

        Components at most one element wide on an axis get zero width (eval mode zeroes them), so train and
        eval outputs agree; ``drop_empty`` removes them, else the layer keeps ``num_components`` slots.
        The start, errors (and the SVD's at the same MACs) and time are logged and kept in
        ``layer.init_report`` (a :class:`.search.SearchReport`).
        """
        out_features, in_features = weight.shape
        segments = data.kernel_positions if config.segments == "kernel" else config.segments
        if in_features % segments:
            raise OptionError("segments", config.segments, f"{segments} blocks do not divide the {in_features} "
                              f"input features of a {out_features}x{in_features} layer",
                              "give a divisor of every replaced layer's in_features, or kernel for conv layers")
        block = in_features // segments
        check_fits_one_component(config.budget, out_features, block)
        work_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32

        def search_layer(components: int) -> GaudiGBLRLinear:
            return cls(block, out_features, num_components=components, bias=False, sigma=None,
                       width_init=1.0, location_init=config.location_init)

        fits = [find_structure(search_layer, part, config.budget * out_features * block, config)
                for part in weight.to(work_dtype).chunk(segments, dim=1)]
        kept = [kept_components(search, config.drop_empty) for search, _ in fits]
        used = max(int(keep.sum()) for keep in kept)
        slots = used if config.drop_empty else max(used, min(config.num_components or block, block, out_features))
        layer = cls(in_features, out_features, num_components=slots, bias=bias is not None, sigma=config.sigma,
                    compute_mode=config.compute_mode, custom_grad=config.custom_grad, no_ste=config.no_ste,
                    width_init=0.0, location_init=0.0, segments=segments).to(weight.device, work_dtype)
        with torch.no_grad():
            for name in ("in_factors", "out_factors"):
                getattr(layer, name).zero_()
            for segment, ((search, _), keep) in enumerate(zip(fits, kept)):
                chosen = slice(segment * slots, segment * slots + int(keep.sum()))
                for name in ("in_factors", "out_factors"):
                    getattr(layer, name)[chosen] = getattr(search, name)[keep]
                for name in ("widths", "locations"):
                    getattr(layer, name)[:, chosen] = getattr(search, name)[:, keep]
        layer.to(dtype=weight.dtype)
        layer._copy_bias(bias)
        report = fits[0][1] if segments == 1 else whole_layer_report(layer, weight, [r for _, r in fits])
        layer.init_report = report
        log.info("gaudi %dx%d budget %.3f: %s start, %d components, MACs %.4f of dense, rel. error %.4f "
                 "(SVD at the same MACs %.4f), op-norm error %.4f, %.1fs", out_features, in_features, config.budget,
                 report.start, layer.num_components, report.macs_fraction, report.rel_error, report.svd_error,
                 report.op_error, report.seconds)
        return layer

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", num_components={self.num_components}, segments={self.segments}, "
                f"rank_per_component={self.rank_per_component}, compute_mode={self.compute_mode}, "
                f"sigma={None if self.no_gaussian else float(self.sigma)}")
