"""Count multiply-adds per sample: structure-aware for linear maps, as-executed for the whole graph."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ..layers import StructuredLinear
from ..modeltree import is_hf_conv1d


def _layer_macs(module: nn.Module, inputs: tuple, output: Tensor) -> int | None:
    """MACs of one call to a linear map, from the structure (``macs_per_token``) where there is one."""
    x = inputs[0]
    if isinstance(module, StructuredLinear):
        return (x.numel() // x.shape[-1]) * module.macs_per_token()
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return (x.numel() // x.shape[-1]) * module.weight.numel()
    if isinstance(module, nn.Conv2d):
        return (output.numel() // module.out_channels) * module.weight.numel()
    return None


@torch.no_grad()
def linear_macs_per_sample(model: nn.Module, inputs: Tensor) -> dict[str, int]:
    """Per linear-map layer (Linear, Conv1D, Conv2d, structured), MACs for one sample of ``inputs``.

    Structured layers count what their structure needs (e.g. Gaudi's effective widths), not what a
    dense-mode implementation happens to execute.
    """
    batch = inputs.shape[0]
    counts: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, (StructuredLinear, nn.Linear, nn.Conv2d)) or is_hf_conv1d(module):
            def hook(mod, args, out, _name=name):
                macs = _layer_macs(mod, args, out)
                if macs is not None:
                    counts[_name] = counts.get(_name, 0) + macs // batch
            hooks.append(module.register_forward_hook(hook))
    try:
        model(inputs)
    finally:
        for h in hooks:
            h.remove()
    return counts


@torch.no_grad()
def executed_flops_per_sample(model: nn.Module, inputs: Tensor) -> int:
    """FLOPs (2 per multiply-add) of every op torch actually runs for one sample, attention included."""
    with FlopCounterMode(display=False) as counter:
        model(inputs)
    return counter.get_total_flops() // inputs.shape[0]
