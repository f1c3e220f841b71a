"""SVD + quantization layer: packing, quantizer, binary-searched rank, fallbacks."""
import pytest
import torch

from structured_compress.layers.quant import dequantize, pack, packed_numel, quantize, unpack
from structured_compress.layers.config import OptionError
from structured_compress.layers.svdq import (SVDQuantConfig, SVDQuantLinear, fake_quantize, max_useful_rank,
                                           search_rank)


def spectrum_matrix(rows: int, cols: int, decay: float = 0.75, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(rows, rows, generator=gen))
    q2, _ = torch.linalg.qr(torch.randn(cols, cols, generator=gen))
    k = min(rows, cols)
    return (q1[:, :k] * decay ** torch.arange(k)) @ q2[:, :k].T


def scan_errors(weight, bias, inputs, bits, group_size):
    """Relative output error of the quantized rank-k layer for every k, the way the search defines it."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    reference = (inputs @ weight.T + bias).norm()
    errors = {}
    for k in range(1, max_useful_rank(*weight.shape) + 1):
        approx = (fake_quantize(u[:, :k], bits, group_size) * s[:k]) @ fake_quantize(vh[:k], bits, group_size)
        errors[k] = ((inputs @ (approx - weight).T).norm() / reference).item()
    return errors


@pytest.mark.parametrize("numel", [1, 2, 7, 8, 33])
def test_int4_pack_unpack_roundtrip(numel):
    codes = torch.randint(-8, 8, (numel,), generator=torch.Generator().manual_seed(numel), dtype=torch.int8)
    packed = pack(codes, 4)
    assert packed.dtype == torch.uint8 and packed.numel() == (numel + 1) // 2 == packed_numel(numel, 4)
    assert torch.equal(unpack(packed, 4, (numel,)), codes)


def test_int8_pack_roundtrip_and_shape_checks():
    codes = torch.randint(-127, 128, (5, 3), dtype=torch.int8)
    assert torch.equal(unpack(pack(codes, 8), 8, (5, 3)), codes)
    with pytest.raises(ValueError, match="need"):
        unpack(pack(codes, 8), 8, (4, 4))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack(torch.tensor([9], dtype=torch.int8), 4)


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, None), (4, 5)])
def test_quantizer_error_is_half_a_step(bits, group_size):
    weight = torch.randn(6, 13, generator=torch.Generator().manual_seed(1))
    codes, scales = quantize(weight, bits, group_size)
    assert codes.abs().max() <= 2 ** (bits - 1) - 1
    step = dequantize(torch.ones_like(codes), scales, group_size)
    assert ((dequantize(codes, scales, group_size) - weight).abs() <= step / 2 + 1e-6).all()


def test_search_rank_matches_a_linear_scan():
    errors = sorted(torch.rand(40, generator=torch.Generator().manual_seed(2)).tolist(), reverse=True)
    for bound in [e + d for e in errors for d in (-1e-6, 0.0, 1e-6)]:
        expected = next((k for k in range(1, 41) if errors[k - 1] <= bound), None)
        assert search_rank(lambda k: errors[k - 1], 40, bound) == expected


@pytest.mark.parametrize("shape,bits,group_size", [((64, 48), 8, None), ((40, 56), 4, 16)])
def test_from_dense_finds_the_smallest_rank_meeting_the_bound(shape, bits, group_size):
    gen = torch.Generator().manual_seed(3)
    weight, bias = spectrum_matrix(*shape), 0.1 * torch.randn(shape[0], generator=gen)
    inputs = torch.randn(128, shape[1], generator=gen)
    errors = scan_errors(weight, bias, inputs, bits, group_size)
    ranks = list(errors)
    assert all(errors[a] > errors[a + 1] for a in range(1, 6))  # strictly decreasing where the bounds lie
    for k in (1, 2, 5):
        bound = errors[1] * 1.001 if k == 1 else (errors[k - 1] + errors[k]) / 2  # met by k, missed by k - 1
        config = SVDQuantConfig(bits=bits, group_size=group_size, max_error=bound)
        layer = SVDQuantLinear.from_dense(weight, bias, config, inputs=inputs)
        scan = next(r for r in ranks if errors[r] <= bound)
        assert scan == k and layer.mode == "factored" and layer.rank == k
        achieved = ((layer(inputs) - (inputs @ weight.T + bias)).norm() / (inputs @ weight.T + bias).norm()).item()
        assert achieved <= bound * (1 + 1e-4)


def test_falls_back_to_quantized_dense_when_no_rank_meets_the_bound():
    gen = torch.Generator().manual_seed(4)
    weight, inputs = torch.randn(32, 24, generator=gen), torch.randn(64, 24, generator=gen)  # flat spectrum
    layer = SVDQuantLinear.from_dense(weight, None, SVDQuantConfig(max_error=0.05), inputs=inputs)
    assert layer.mode == "qdense" and layer.rank is None
    assert layer.w_packed.numel() == 32 * 24 and layer.macs_per_token() == 32 * 24
    assert ((layer(inputs) - inputs @ weight.T).norm() / (inputs @ weight.T).norm()) <= 0.05


def test_falls_back_to_float_dense_when_even_quantized_dense_misses():
    gen = torch.Generator().manual_seed(5)
    weight, bias = torch.randn(16, 12, generator=gen), torch.randn(16, generator=gen)
    inputs = torch.randn(32, 12, generator=gen)
    layer = SVDQuantLinear.from_dense(weight, bias, SVDQuantConfig(bits=4, max_error=1e-6), inputs=inputs)
    assert layer.mode == "dense"
    assert torch.equal(layer(inputs), torch.nn.functional.linear(inputs, weight, bias))


def test_int4_layer_that_misses_the_bound_falls_back_to_int8_before_float():
    gen = torch.Generator().manual_seed(4)
    weight, inputs = torch.randn(32, 24, generator=gen), torch.randn(64, 24, generator=gen)  # flat spectrum
    without = SVDQuantLinear.from_dense(weight, None, SVDQuantConfig(bits=4, max_error=0.05), inputs=inputs)
    layer = SVDQuantLinear.from_dense(weight, None, SVDQuantConfig(bits=4, max_error=0.05, fallback_bits=8),
                                      inputs=inputs)
    assert without.mode == "dense"  # int4 misses 5 % even as a whole matrix
    assert (layer.mode, layer.bits) == ("qdense", 8) and layer.config()["bits"] == 8
    assert ((layer(inputs) - inputs @ weight.T).norm() / (inputs @ weight.T).norm()) <= 0.05
    strict = SVDQuantLinear.from_dense(weight, None, SVDQuantConfig(bits=4, max_error=1e-6, fallback_bits=8),
                                      inputs=inputs)
    assert strict.mode == "dense"  # int8 misses too: float


def test_factors_bigger_than_quantized_dense_are_not_kept():
    weight = torch.randn(24, 16, generator=torch.Generator().manual_seed(6))
    # budget 1: rank floor(mn/(m+n)), whose factors take more bytes than the int8 dense weight
    full = SVDQuantLinear.from_dense(weight, None, SVDQuantConfig(budget=1.0))
    assert full.mode == "qdense" and full.storage_bytes() < 2 * weight.numel()
    half = SVDQuantLinear.from_dense(weight, None, SVDQuantConfig(budget=0.5))
    assert half.mode == "factored" and half.storage_bytes() < full.storage_bytes()


def test_int4_factors_are_packed_two_per_byte():
    weight = spectrum_matrix(64, 48)
    int8 = SVDQuantLinear.from_dense(weight, None, SVDQuantConfig(budget=0.25, bits=8))
    int4 = SVDQuantLinear.from_dense(weight, None, SVDQuantConfig(budget=0.25, bits=4))
    assert int4.rank == int8.rank
    assert int4.u_packed.numel() == (64 * int4.rank + 1) // 2 and int4.v_packed.numel() == (int4.rank * 48 + 1) // 2
    x = torch.randn(3, 48)
    assert torch.allclose(int4(x), x @ int4.to_dense_weight().T, atol=1e-5)
    assert int4.storage_bytes() < 0.6 * int8.storage_bytes()


def test_max_error_needs_inputs():
    with pytest.raises(OptionError, match="calibration_batches=0: .*needs calibration inputs"):
        SVDQuantLinear.from_dense(torch.randn(8, 8), None, SVDQuantConfig(max_error=0.1))


def test_half_cast_keeps_the_scales_exact():
    layer = SVDQuantLinear.from_dense(spectrum_matrix(32, 24), None, SVDQuantConfig(budget=0.3))
    before = layer.to_dense_weight().clone()
    layer.to(torch.bfloat16)
    assert layer.u_scales.dtype == torch.int16
    assert torch.allclose(layer.to_dense_weight().float(), before, rtol=1e-2, atol=1e-3)
