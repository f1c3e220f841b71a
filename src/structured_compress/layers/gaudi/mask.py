"""Gaudi-GBLR interval masks (arXiv 2310.18882): the soft mask of a width and a location, and on-grid intervals.

A mask is written in the frequency domain -- the Dirichlet kernel (the DFT of a box) times a Gaussian -- so the
interval's size and position get gradients. Widths and locations are fractions of the axis length; ``2 x K``
tensors have rows ``[input; output]``. On the grid ``1/N`` the masks are exact 0/1 intervals, whose boolean
form and MACs cost live here too, shared by the layer, the structure search and the compact forward.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

MASK_THRESHOLD = 1e-3  # eval-time mask entries below this are zeroed; FLOPs count entries above it


def _complex(amplitude: Tensor, phase: Tensor) -> Tensor:
    """``amplitude * exp(i phase)`` for a real (possibly negative) amplitude, autograd-friendly."""
    return torch.complex(amplitude * torch.cos(phase), amplitude * torch.sin(phase))


def _spectrum_terms(width: Tensor, location: Tensor, n: int, sigma) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(k, w, l, envelope)`` pieces shared by the mask and its closed-form derivatives:
    ``envelope_k = exp(-k^2 / (2 sigma^2)) / sinc(k / n)`` (no Gaussian when ``sigma`` is None)."""
    freqs = torch.arange(n // 2 + 1, device=width.device, dtype=width.dtype)
    envelope = 1.0 / torch.sinc(freqs / n)
    if sigma is not None:
        sigma = torch.as_tensor(sigma, device=width.device, dtype=width.dtype)
        envelope = envelope * torch.exp(-freqs.square() / (2 * sigma.square()))
    return freqs, width[:, None], location[:, None], envelope


def gaudi_spectrum(width: Tensor, location: Tensor, n: int, sigma=None) -> Tensor:
    """Half spectrum ``[K, n//2 + 1]`` of the mask:
    ``w sinc(k w) / sinc(k/n) exp(-k^2 / (2 sigma^2)) exp(i [pi k (1/n - w) - 2 pi k l])``."""
    freqs, w, loc, envelope = _spectrum_terms(width, location, n, sigma)
    phase = math.pi * freqs * (1.0 / n - w) - 2 * math.pi * freqs * loc
    return _complex(w * torch.sinc(freqs * w) * envelope, phase)


class _GaudiMaskFunction(torch.autograd.Function):
    """The Gaudi mask with the closed-form backward: ``dg/dw = irfft(exp(-2 pi i k w) C_k)`` with
    ``C_k = exp(i pi (k/n - 2 k l)) envelope_k``, and ``dg/dl = irfft(-2 pi i k G_k)``. Saves autograd
    going through the complex exponentials; the result equals the autograd gradient."""

    @staticmethod
    def forward(ctx, width: Tensor, location: Tensor, n: int, sigma) -> Tensor:
        ctx.n, ctx.sigma = n, sigma
        ctx.save_for_backward(width, location)
        return torch.fft.irfft(gaudi_spectrum(width, location, n, sigma), n=n, norm="forward")

    @staticmethod
    def backward(ctx, grad_mask: Tensor):
        width, location = ctx.saved_tensors
        n = ctx.n
        freqs, w, loc, envelope = _spectrum_terms(width, location, n, ctx.sigma)
        grad_width = grad_location = None
        if ctx.needs_input_grad[0]:
            phase = math.pi * freqs / n - 2 * math.pi * freqs * loc - 2 * math.pi * freqs * w
            d_width = torch.fft.irfft(_complex(envelope.expand_as(phase), phase), n=n, norm="forward")
            grad_width = (grad_mask * d_width).sum(-1)
        if ctx.needs_input_grad[1]:
            spectrum = gaudi_spectrum(width, location, n, ctx.sigma)
            d_location = torch.fft.irfft(spectrum * (-2j * math.pi * freqs), n=n, norm="forward")
            grad_location = (grad_mask * d_location).sum(-1)
        return grad_width, grad_location, None, None


def gaudi_mask(width: Tensor, location: Tensor, n: int, sigma=None, custom_grad: bool = False) -> Tensor:
    """Soft interval masks ``[K, n]`` for ``K`` widths/locations (fractions of ``n``), as in training:
    no rounding, no shrink. ``irfft`` with forward normalisation of :func:`gaudi_spectrum`. With ``sigma``
    None and integer ``w n``, ``l n`` it is exactly the circular indicator of ``[l n, l n + w n)``."""
    if custom_grad:
        return _GaudiMaskFunction.apply(width, location, n, sigma)
    return torch.fft.irfft(gaudi_spectrum(width, location, n, sigma), n=n, norm="forward")


def snap_to_grid(value: Tensor, n: int) -> Tensor:
    """``round(value n) / n`` in the forward pass, identity gradient (straight-through estimator)."""
    return torch.round(value.detach() * n) / n + (value - value.detach())


def snapped_cost(widths: Tensor, axis_sizes: tuple[int, int]) -> Tensor:
    """MACs bound ``sum_i (r_i + c_i)`` over live components, with widths on the forward's grid: a component
    is live when it is more than one element wide on both axes (eval mode zeroes the others)."""
    sizes = torch.tensor(axis_sizes, dtype=torch.float64, device=widths.device)[:, None]
    cells = torch.round(widths.double().clamp(0.0, 1.0) * sizes)  # float64, exactly as the forward snaps
    return (cells.sum(0) * (cells > 1).all(0)).sum()


@torch.no_grad()
def project_widths_(widths: Tensor, axis_sizes: tuple[int, int], budget_units: float) -> None:
    """Clamp widths to [0, 1], then take the same fraction off every width (clipping at 0), the smallest
    that brings :func:`snapped_cost` within ``budget_units`` (bisection: the cost falls monotonically)."""
    widths.clamp_(0.0, 1.0)
    if float(snapped_cost(widths, axis_sizes)) <= budget_units:
        return
    low, high = 0.0, float(widths.max())
    for _ in range(48):
        middle = (low + high) / 2
        if float(snapped_cost((widths - middle).clamp_min(0.0), axis_sizes)) > budget_units:
            low = middle
        else:
            high = middle
    widths.copy_((widths - high).clamp_min(0.0))  # the same arithmetic as the accepted test above


def interval_masks(widths: Tensor, locations: Tensor, axis_sizes: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Boolean ``([K, n], [K, m])`` circular interval masks of on-grid widths/locations (rows [input; output])."""
    masks = []
    for axis, size in enumerate(axis_sizes):
        start = torch.round(locations[axis] * size).long()[:, None]
        length = torch.round(widths[axis].clamp(0.0, 1.0) * size).long()[:, None]
        index = torch.arange(size, device=widths.device)[None, :]
        masks.append((index - start) % size < length)
    return masks[0], masks[1]
