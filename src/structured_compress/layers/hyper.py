"""Hyper-compression: each pair of weights becomes the index of the nearest point of a sampled irrational
winding (a sheared lattice filling a square of side ``l`` around the pairs' centre).

Pairs outside the square are sorted into ``K`` distance classes; class ``i`` is shrunk towards the centre by
``f_i = (l/2) / e_i`` before the lookup and expanded after it, and the stored integer is
``codebook index + (u + 1) * class``. The codebook size ``u`` comes from ``codebook_sizes`` (first one whose
mean absolute error meets ``loss_max``), ``K <= max_classes`` minimises the MAE. A layer that misses
``loss_max`` with every size is stored raw. Indices are bit-packed (fixed width, big-endian, zero-padded to
a byte). The weight is decoded once, on ``from_dense`` and after every ``load_state_dict``, into the
non-persistent buffer ``weight``; ``forward`` is then a dense matmul.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree
from torch import Tensor

from .base import Calibration, StructuredLinear, register_layer
from .config import LayerConfig, option

log = logging.getLogger(__name__)

SIDE_FIELDS = 4  # centre x, centre y, farthest distance D, square side l (float32 each)


def codebook(center: np.ndarray, side: float, size: int) -> np.ndarray:
    """``size + 1`` points (float64): the centre, then ``c - l/2 + ((k l / q^2) mod l, (k l / q) mod l)`` for
    ``k < size``, ``q = ceil(sqrt(size))``. Encoder and decoder both call this, so boundary rounding agrees."""
    q = math.ceil(math.sqrt(size))
    steps = np.arange(size, dtype=np.float64)
    points = np.stack([np.mod(steps * side / q ** 2, side), np.mod(steps * side / q, side)], axis=1)
    return np.concatenate([center[None, :], points + (center - side / 2)], axis=0)


def class_factors(side: float, farthest: float, classes: int) -> np.ndarray:
    """Shrink factor per class: 1 for class 0 (inside the square), ``(l/2) / e_i`` with evenly spaced class
    edges ``e_i = l/2 + i (D - l/2) / K`` for classes ``1..K``."""
    edges = side / 2 + np.arange(1, classes + 1) * (farthest - side / 2) / max(classes, 1)
    return np.concatenate([[1.0], (side / 2) / edges])


def pack_indices(indices: np.ndarray, bits: int) -> np.ndarray:
    """Fixed-width big-endian bit fields, concatenated and zero-padded at the end to whole bytes."""
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint32)
    return np.packbits(((indices.astype(np.uint32)[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1))


def unpack_indices(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    fields = np.unpackbits(packed, count=count * bits).reshape(count, bits).astype(np.int64)
    return fields @ (np.int64(1) << np.arange(bits - 1, -1, -1, dtype=np.int64))


def decode_pairs(indices: np.ndarray, center: np.ndarray, side: float, farthest: float, size: int,
                 classes: int) -> np.ndarray:
    """Pairs (float64, ``count x 2``) from stored indices and the layer's side information."""
    points = codebook(center, side, size)
    klass, entry = np.divmod(indices, size + 1)
    factors = class_factors(side, farthest, classes)[klass]
    return center + (points[entry] - center) / factors[:, None]


@dataclass
class Encoding:
    indices: np.ndarray
    center: np.ndarray
    side: float
    farthest: float
    size: int
    classes: int
    mae: float  # over the original values (padding excluded)


def _f32(value) -> np.ndarray:
    """Round to float32 and back: the encoder must use exactly the side information the decoder reads."""
    return np.asarray(value, dtype=np.float32).astype(np.float64)


def encode(values: np.ndarray, side: float, sizes: list[int], max_classes: int, mae_max: float) -> Encoding:
    """Encode a flat float array; returns the first codebook size whose MAE is ``<= mae_max`` (else the last)."""
    numel = values.size
    if numel % 2:
        values = np.append(values, values.mean())
    pairs = values.reshape(-1, 2)
    center = _f32(pairs.mean(axis=0))
    side = float(_f32(side))
    offset = pairs - center
    distance = np.linalg.norm(offset, axis=1)
    farthest = float(_f32(max(distance.max(), side / 2)))
    inner = np.abs(offset).max(axis=1) <= side / 2
    for size in sizes:
        tree = cKDTree(codebook(center, side, size))
        inner_indices = tree.query(pairs[inner])[1]
        best = None
        for classes in [0] if inner.all() else range(1, max_classes + 1):
            indices = np.empty(len(pairs), dtype=np.int64)
            indices[inner] = inner_indices
            if classes:
                factors = class_factors(side, farthest, classes)
                klass = np.searchsorted(side / 2 / factors[1:], distance[~inner], side="left") + 1
                klass = np.minimum(klass, classes)  # D was rounded to float32: the farthest pair may sit above it
                shrunk = center + factors[klass][:, None] * offset[~inner]
                indices[~inner] = tree.query(shrunk)[1] + (size + 1) * klass
            decoded = decode_pairs(indices, center, side, farthest, size, classes).reshape(-1)[:numel]
            mae = float(np.abs(decoded - values[:numel]).mean())
            if best is None or mae <= best.mae:  # ties go to more classes
                best = Encoding(indices, center, side, farthest, size, classes, mae)
        if best.mae <= mae_max:
            break
    return best


def _float_bits(values) -> Tensor:
    """float32 values as int32 bit patterns, so ``module.to(dtype)`` cannot round the side information."""
    return torch.from_numpy(np.asarray(values, dtype=np.float32).view(np.int32).copy())


@dataclass
class HyperConfig(LayerConfig):
    """Hyper-compression: each pair of weights -> index of the nearest point on a sampled irrational winding
    (a codebook of u points in a square of side rect_l), outliers in up to max_classes distance classes;
    ~log2((u+1)(K+1))/2 bits per weight (6.5 for u=1600, K=3). Decoded once on load; dense matmul."""

    layer_type = "hyper"
    budget: float = option(1.0, "unused: the size follows from the codebook", gt=0, le=1)
    budget_of: Literal["none"] = option("none", "what budget counts: none (the codebook sets the size)")
    rect_l: float | None = option(None, "side of the codebook's square in weight units (paper: 0.1; null = "
                                  "rect_l_std x the layer's weight std)", gt=0)
    # on MiniLM's linears (std 0.01-0.1) 4 std gave 3-5 % relative Frobenius error where a fixed 0.1 gave 3-9 %
    rect_l_std: float = option(4.0, "square side in weight standard deviations when rect_l is null (matches the "
                               "codebook spacing to the layer's scale)", gt=0)
    codebook_sizes: list[int] = option([1600], "codebook sizes u tried in order: the first whose relative MAE "
                                       "meets loss_max is kept", ge=1)
    max_classes: int = option(3, "most distance classes K for the pairs outside the square (the best MAE wins)",
                              ge=1)
    loss_max: float = option(0.05, "bound on the relative MAE mean|W_hat - W| / mean|W|; a layer that misses it "
                             "with every codebook size is stored raw", gt=0)


@register_layer(HyperConfig)
class HyperCompressedLinear(StructuredLinear):
    """``y = W_hat x + b`` with ``W_hat`` decoded from bit-packed pair indices (``codes``, ``index_bits`` per
    pair of weights) and ``side`` (centre, farthest distance, square side, as float32 bits); ``raw=True``
    stores the weight itself (``raw_weight``). The bias stays float. The constructor allocates zeros and
    decodes nothing; ``from_dense`` encodes.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, codebook_size: int = 1600,
                 classes: int = 0, index_bits: int = 1, raw: bool = False):
        super().__init__(in_features, out_features, bias)
        if codebook_size < 1 or classes < 0 or index_bits < 1:
            raise ValueError(f"need codebook_size >= 1, classes >= 0, index_bits >= 1; got {codebook_size}, "
                             f"{classes}, {index_bits}")
        self.codebook_size, self.classes, self.index_bits = int(codebook_size), int(classes), int(index_bits)
        self.raw = bool(raw)
        self.num_pairs = math.ceil(in_features * out_features / 2)
        if raw:
            self.register_buffer("raw_weight", torch.zeros(out_features, in_features))
        else:
            self.register_buffer("codes", torch.zeros(math.ceil(self.num_pairs * index_bits / 8), dtype=torch.uint8))
            self.register_buffer("side", torch.zeros(SIDE_FIELDS, dtype=torch.int32))
        self.register_buffer("weight", torch.zeros(out_features, in_features), persistent=False)
        self.register_load_state_dict_post_hook(_decode_after_load)

    @classmethod
    def initialize(cls, weight: Tensor, bias: Tensor | None, config: HyperConfig,
                   data: Calibration) -> "HyperCompressedLinear":
        """Encode ``weight`` with the first of ``config.codebook_sizes`` that meets ``loss_max`` (else raw)."""
        out_features, in_features = weight.shape
        values = weight.cpu().double().numpy().reshape(-1)
        scale = float(np.abs(values).mean())
        side = config.rect_l if config.rect_l is not None else config.rect_l_std * float(values.std())
        bound = config.loss_max * scale
        encoding = None if side <= 0 or scale == 0 else encode(values, side, config.codebook_sizes,
                                                               config.max_classes, bound)
        if encoding is None or encoding.mae > bound:
            log.info("hyper %dx%d: relative MAE above loss_max=%g with every codebook size; stored raw",
                     out_features, in_features, config.loss_max)
            layer = cls(in_features, out_features, bias=bias is not None, raw=True)
            layer.raw_weight = weight.clone()
        else:
            bits = max(1, int(encoding.indices.max()).bit_length())
            layer = cls(in_features, out_features, bias=bias is not None, codebook_size=encoding.size,
                        classes=encoding.classes, index_bits=bits)
            layer.codes.copy_(torch.from_numpy(pack_indices(encoding.indices, bits)))
            layer.side.copy_(_float_bits([*encoding.center, encoding.farthest, encoding.side]))
            log.debug("hyper %dx%d: u=%d K=%d %d bits/pair, relative MAE %.4f", out_features, in_features,
                      encoding.size, encoding.classes, bits, encoding.mae / scale)
        layer.to(weight.device, weight.dtype)
        layer._copy_bias(bias)
        layer.decode_()
        return layer

    encoded_only = False  # set by keep_encoded_: decode on every forward instead of keeping the weight

    @torch.no_grad()
    def decode_(self) -> None:
        """Rebuild the non-persistent ``weight`` buffer from the stored state (an empty placeholder while
        :meth:`keep_encoded_` is on)."""
        if self.raw:
            self.weight = self.raw_weight
        elif self.encoded_only:
            self.weight = self.codes.new_empty(0, dtype=self.weight.dtype)
        else:
            self.weight = self._decoded()

    def keep_encoded_(self, enabled: bool = True) -> None:
        """Hold only the codes (``index_bits / 2`` bits per weight) and decode the weight in every forward, as
        for memory-bound inference: the decode time (``benchmarks/layer_speed.py`` reports ``decode_ms``)
        is paid per call. ``False`` decodes once and keeps the weight again. Raw layers are unaffected."""
        self.encoded_only = bool(enabled) and not self.raw
        self.decode_()

    @torch.no_grad()
    def _decoded(self) -> Tensor:
        """The weight decoded from ``codes`` and ``side``, on the codes' device in the float dtype."""
        center_x, center_y, farthest, side = self.side.cpu().numpy().view(np.float32).astype(np.float64)
        indices = unpack_indices(self.codes.cpu().numpy(), self.index_bits, self.num_pairs)
        if indices.max(initial=0) >= (self.codebook_size + 1) * (self.classes + 1):
            raise ValueError(f"hyper codes hold index {indices.max()}, beyond codebook_size={self.codebook_size} "
                             f"and classes={self.classes}: corrupted or mismatched state")
        pairs = decode_pairs(indices, np.array([center_x, center_y]), side, farthest, self.codebook_size, self.classes)
        flat = torch.from_numpy(pairs.reshape(-1)[: self.in_features * self.out_features].astype(np.float32))
        return flat.reshape(self.out_features, self.in_features).to(self.codes.device, self.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.to_dense_weight().to(x.dtype), self.bias)

    def conv_forward(self, x: Tensor, geometry) -> Tensor:
        """The (decoded) weight as one dense conv kernel: this type stores a dense weight, just encoded."""
        kernel = self.to_dense_weight().to(x.dtype).reshape(self.out_features, geometry.in_channels,
                                                             *geometry.kernel_size)
        return geometry.conv(x, kernel, None if self.bias is None else self.bias.to(x.dtype))

    def to_dense_weight(self) -> Tensor:
        return self._decoded() if self.encoded_only else self.weight

    def num_params(self) -> int:
        """Numbers stored: one integer per pair (or every raw weight), the side information, the bias."""
        stored = self.in_features * self.out_features if self.raw else self.num_pairs + SIDE_FIELDS
        return stored + self.bias_params()

    def macs_per_token(self) -> int:
        return self.in_features * self.out_features

    def bits_per_weight(self) -> float:
        """``index_bits / 2`` plus the side information (4 float32) spread over the weights; raw: the dtype."""
        numel = self.in_features * self.out_features
        if self.raw:
            return 8.0 * self.raw_weight.element_size()
        return (self.index_bits * self.num_pairs + 32 * SIDE_FIELDS) / numel

    def config(self) -> dict:
        return {"bias": self.bias is not None, "codebook_size": self.codebook_size, "classes": self.classes,
                "index_bits": self.index_bits, "raw": self.raw}

    def extra_repr(self) -> str:
        mode = "raw" if self.raw else f"u={self.codebook_size}, K={self.classes}, bits/pair={self.index_bits}"
        return super().extra_repr() + f", {mode}"


def _decode_after_load(module: HyperCompressedLinear, incompatible_keys) -> None:
    module.decode_()
