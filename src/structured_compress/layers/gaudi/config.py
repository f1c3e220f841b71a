"""The typed config of ``layer=gaudi`` (``configs/layer/gaudi.yaml`` is generated from it). Torch-free."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Literal

from ..config import LayerConfig, OptionError, option, show

StartKind = Literal["blocks", "lowrank", "greedy", "given"]
ComputeMode = Literal["auto", "dense", "lr", "compact"]
STARTS: tuple[str, ...] = typing.get_args(StartKind)
COMPUTE_MODES: tuple[str, ...] = typing.get_args(ComputeMode)

# options that only the named starts read: setting one without them would change nothing
USED_BY_STARTS = {"sweeps": ("blocks",), "niter": ("greedy", "given"), "weight_lr": ("greedy", "given"),
                  "structure_lr_base": ("greedy", "given"), "row_thresholds": ("greedy",),
                  "col_thresholds": ("greedy",), "filter_std": ("greedy",), "location_init": ("given",)}


@dataclass
class GaudiConfig(LayerConfig):
    """Gaudi-GBLR: a sum of rank-1 blocks whose row/column intervals are found by a structure search
    (docs/gaudi.md) and can keep learning in training. Every start kind in `starts` is fitted within the
    budget and the lowest relative error wins: blocks = truncated SVD plus rank-1 blocks of its residual, then
    `sweeps` least-squares sweeps (seconds per layer, never worse than the SVD at the same MACs); lowrank = the
    plain truncated SVD; greedy = the reference's interval search and given = full widths at `location_init`,
    both refined by `niter` gradient steps. Options that only act with a start kind are errors without it.
    Stored parameters exceed the MACs: each kept component stores full-length factors."""

    layer_type = "gaudi"
    budget: float = option(0.25, "fraction of the dense layer's MACs kept, in (0, 1]; with sigma null the "
                           "layer's MACs stay within it", gt=0, le=1)
    budget_of: Literal["macs"] = option("macs", "what budget counts: macs (multiply-adds per token)")
    starts: list[StartKind] = option(["blocks"], "start kinds fitted, the best kept: blocks | lowrank | greedy (the "
                                     "reference's find_mask) | given")
    sweeps: int = option(8, "alternating least-squares sweeps on the factors of the blocks start", ge=0)
    niter: int = option(200, "gradient steps refining the greedy and given starts (0 = only cut to the budget)",
                        ge=0)
    weight_lr: float = option(0.02, "AdamW lr of the factors in that refinement, in units of the weight's RMS",
                              gt=0)
    structure_lr_base: float = option(10.0, "lr of widths/locations in that refinement, divided by min(m, n)",
                                      gt=0)
    row_thresholds: list[float] = option([0.98], "greedy start: row correlation thresholds (fraction of the "
                                         "max), one candidate per row x column pair", gt=0, le=1)
    col_thresholds: list[float] = option([0.98], "greedy start: column correlation thresholds (fraction of "
                                         "the max)", gt=0, le=1)
    filter_std: float = option(10.0, "greedy start: std of the circular Gaussian smoothing the correlation "
                               "profiles, in elements", gt=0)
    location_init: float | Literal["unif", "linspace"] = option(
        "unif", "given start: interval locations, a fraction of the axis in [0, 1), unif (random) or linspace",
        ge=0, lt=1)
    num_components: int | None = option(None, "most components per layer (per segment) the search may use "
                                        "(null = min(m, n))", ge=1)
    drop_empty: bool = option(True, "drop components the search leaves empty (false: keep min(m, n) slots, "
                              "unused at width 0, as the reference)")
    sigma: float | None = option(None, "Gaussian blur of the masks (null = exact intervals, as fine-tuning uses; "
                                 "a blur adds MACs)", gt=0)
    compute_mode: ComputeMode = option("auto", "auto (compact intervals when valid and cheap, else dense) | dense "
                                       "(the reference) | lr | compact")
    custom_grad: bool = option(False, "closed-form mask gradient instead of autograd (the same values)")
    no_ste: bool = option(False, "train widths/locations off the 1/N grid (no straight-through snapping)")
    segments: int | Literal["kernel"] = option(1, "split the input axis into this many blocks, each its own "
                                               "Gaudi matrix; kernel = one per conv kernel position", ge=1)

    def validate(self) -> None:
        if len(set(self.starts)) < len(self.starts):
            raise OptionError("starts", self.starts, "names a start kind twice", "list each kind once")
        changed = {name for name in USED_BY_STARTS if getattr(self, name) != default_of(name)}
        for name in sorted(changed):
            users = USED_BY_STARTS[name]
            if not set(users) & set(self.starts):
                raise OptionError(name, getattr(self, name), f"it acts on the {' and '.join(users)} start"
                                  f"{'s' * (len(users) > 1)} only and starts={show(self.starts)} has none",
                                  f"add {users[0]} to starts, or remove {name}")
        for name in sorted(changed & {"weight_lr", "structure_lr_base"}):
            if self.niter == 0:
                raise OptionError(name, getattr(self, name), "niter=0 runs no refinement step, so it changes "
                                  "nothing", f"set niter > 0, or remove {name}")
        if self.compute_mode == "compact" and self.sigma is not None:
            raise OptionError("compute_mode", "compact", f"the compact form needs exact interval masks and "
                              f"sigma={self.sigma} blurs them, so it would always run dense",
                              "set sigma: null, or compute_mode: dense")


def default_of(name: str) -> object:
    """The declared default of ``GaudiConfig.<name>``."""
    field = GaudiConfig.__dataclass_fields__[name]
    return field.default_factory() if field.default is dataclasses.MISSING else field.default
