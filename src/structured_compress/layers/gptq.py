"""GPTQ: Hessian-aware, error-compensating rounding of a weight onto an integer grid (arXiv 2210.17323).

Minimises the output error ``||(W_hat - W) X^T||_F`` over calibration inputs ``X`` (rows are input vectors)
instead of the weight error. Columns are rounded one at a time, left to right; each column's rounding error
is pushed onto the columns not yet rounded, weighted by the inverse of ``H = X^T X`` (the layer's input Gram
matrix, as ``collect_input_gram`` returns it), so the later columns absorb what the earlier ones lost.
Group grids are fitted to the error-updated weights when the rounding reaches each group's first column.
With a diagonal ``H`` nothing is pushed and the result is round-to-nearest.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .quant import check_bits, grid, grid_values, num_groups, round_to_grid

DAMPING = 0.01  # fraction of the mean diagonal of H added to it: keeps the Cholesky stable
_BLOCK = 128  # columns rounded before the deferred update of the rest (a rounded multiple of the group size)


def inverse_hessian_factor(gram: Tensor, damping: float = DAMPING) -> tuple[Tensor, Tensor]:
    """``(U, dead)``: the upper Cholesky factor of ``(H + damping * mean(diag H) I)^-1`` in float64 (the
    row-by-row elimination GPTQ needs) and the mask of input features that never fire (zero diagonal)."""
    hessian = gram.detach().double().clone()
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1.0
    diagonal = hessian.diagonal()
    diagonal += damping * diagonal.mean()
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
    return torch.linalg.cholesky(inverse, upper=True), dead


def gptq_quantize(weight: Tensor, gram: Tensor, bits: int, group_size: int | None = None, symmetric: bool = True,
                  damping: float = DAMPING, gguf: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """GPTQ-rounded ``(codes, scales, offsets)`` of ``weight`` (rows x cols) for inputs whose Gram matrix is
    ``gram`` (cols x cols), on the grid :func:`quant.quantize_grid` uses for the same arguments, so
    ``quant.dequantize`` reads it."""
    check_bits(bits)
    rows, cols = weight.shape
    if gram.shape != (cols, cols):
        raise ValueError(f"gptq gram must be in_features x in_features = {cols}x{cols}, got {tuple(gram.shape)}")
    factor, dead = inverse_hessian_factor(gram.to(weight.device), damping)
    factor = factor.float()
    work = weight.detach().float().clone()
    work[:, dead] = 0.0
    size = cols if group_size is None else group_size
    groups = num_groups(cols, group_size)
    codes = torch.empty(rows, cols, device=weight.device)
    scales = torch.empty(rows, groups, dtype=torch.float16, device=weight.device)
    zeros = None if symmetric else torch.empty(rows, groups, dtype=torch.float16 if gguf else torch.int8,
                                               device=weight.device)
    block = size * max(1, _BLOCK // size) if group_size is not None else _BLOCK
    for start in range(0, cols, block):
        end = min(start + block, cols)
        errors = torch.empty(rows, end - start, device=weight.device)
        for col in range(start, end):
            if col % size == 0:
                scale, zero = grid(work[:, col:col + size], bits, symmetric, gguf)
                scales[:, col // size] = scale
                if zeros is not None:
                    zeros[:, col // size] = zero
                scale, zero = scale.float(), None if zero is None else zero.float()
            codes[:, col] = round_to_grid(work[:, col], scale, zero, bits, gguf)
            rounded = grid_values(codes[:, col], scale, zero, gguf)
            error = (work[:, col] - rounded) / factor[col, col]
            work[:, col + 1:end] -= error[:, None] * factor[col, col + 1:end][None, :]
            errors[:, col - start] = error
        work[:, end:] -= errors @ factor[start:end, end:]
    return codes.to(torch.int8), scales, zeros
