"""Every layer's fast forward path equals its reference path; the cache follows the layer's state; the opt-in
int8 paths stay within the error their activation rounding allows.

Tolerances: the fast paths do the same multiplications as the references, regrouped (``s`` folded into a
factor, factors merged into one matrix, sums split over blocks differently), so results differ by float32
rounding: at most a few ulps times the length of the longest sum (here <= 200 terms), i.e. relative to the
output scale under ``200 * 2**-24 ~ 1.2e-5``; ``rtol = atol/scale = 1e-4`` leaves a margin. Paths that only
move data (bmm on views, the same matmul calls) are checked for exact equality.
"""
from __future__ import annotations

import pytest
import torch

from structured_compress.layers import LAYERS
from structured_compress.layers.fastpath import (cached, clear_caches, contiguous_grad, int8_factors, int8_matmul,
                                                 quantize_rows, reference_paths, set_int8_activations)

IN, OUT = 96, 64

CASES = [
    ("lowrank", {}),
    ("lowrank", {"rank": 60}),  # past break-even: merged weight in inference
    ("monarch", {}),
    ("monarch", {"nblocks": 5}),  # padding on both sides
    ("monarch", {"nblocks": 1}),  # one block: the output transpose is a no-op view
    ("blockdiag", {}),
    ("blockdiag", {"nblocks": 5}),  # padded, bias added after the slice
    ("blockdiag", {"nblocks": 30}),  # 3-row blocks: the block cut at out_features is not the last one
    ("blockdiag", {"residual_fraction": 0.4}),
    ("svdq", {}),
    ("svdq", {"bits": 4, "group_size": 16}),
    ("svdq", {"rank": 40}),  # stored as qdense (factored would be larger): cached dequantized weight
    ("tsvd", {}),  # rank cap past break-even: merged weight
    ("tsvd", {"max_rank": 8}),  # factored
]


def _layer(name: str, options: dict, bias: bool = True, shape: tuple[int, int] = (OUT, IN)):
    torch.manual_seed(0)
    weight = torch.randn(*shape) / shape[1] ** 0.5
    config = LAYERS[name].Config.from_options(options, 0.25)
    return LAYERS[name].from_dense(weight, torch.randn(shape[0]) if bias else None, config)


def _assert_close(fast: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item() if ref.numel() else 0.0
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name,options", CASES)
def test_fast_forward_and_input_gradient_equal_reference(name, options, bias):
    layer = _layer(name, options, bias)
    x = torch.randn(2, 7, IN, requires_grad=True)
    for training in (True, False):
        layer.train(training)
        fast = layer(x)
        (grad_fast,) = torch.autograd.grad(fast.square().sum(), x)
        with reference_paths():
            ref = layer(x)
            (grad_ref,) = torch.autograd.grad(ref.square().sum(), x)
        _assert_close(fast, ref)
        _assert_close(grad_fast, grad_ref)
        with torch.inference_mode():
            _assert_close(layer(x), ref.detach())


@pytest.mark.parametrize("name,options", [c for c in CASES if c[0] in ("lowrank", "monarch", "blockdiag")])
def test_fast_parameter_gradients_equal_reference(name, options):
    layer = _layer(name, options)
    x = torch.randn(11, IN)
    grads_fast = torch.autograd.grad(layer(x).square().sum(), list(layer.parameters()), materialize_grads=True)
    with reference_paths():
        grads_ref = torch.autograd.grad(layer(x).square().sum(), list(layer.parameters()), materialize_grads=True)
    for fast, ref in zip(grads_fast, grads_ref):
        _assert_close(fast, ref)


def test_bmm_path_is_exact_when_nothing_is_regrouped():
    # blockdiag only: Monarch's fast path multiplies transposed operands (feature-major), which BLAS may sum
    # in another order; its equality to float32 rounding is checked above
    layer = _layer("blockdiag", {})
    x = torch.randn(13, IN)
    with reference_paths():
        ref = layer(x)
    assert torch.equal(layer(x), ref)


@pytest.mark.parametrize("wrapped", [False, True])
def test_contiguous_grad_hands_on_a_contiguous_gradient_of_the_same_value(wrapped):
    x = torch.randn(4, 6, requires_grad=True)
    seen = []
    inner = x * 1.0
    inner.register_hook(lambda grad: seen.append(grad))
    out = contiguous_grad(inner) if wrapped else inner
    (out.t() * torch.arange(24.0).reshape(6, 4)).sum().backward()
    assert seen[0].is_contiguous() == wrapped  # autograd alone passes on the transposed view
    assert torch.equal(seen[0], torch.arange(24.0).reshape(6, 4).t())
    with torch.no_grad():
        assert contiguous_grad(inner) is inner


@pytest.mark.parametrize("name,options", [("svdq", {}), ("svdq", {"rank": 40}), ("tsvd", {}), ("tsvd", {"max_rank": 8}),
                                          ("lowrank", {"rank": 60})])
def test_cache_follows_state_changes(name, options):
    layer, other = _layer(name, options).eval(), _layer(name, options, shape=(OUT, IN))
    with torch.no_grad():
        for tensor in other.state_dict().values():
            if tensor.is_floating_point():
                tensor.mul_(-2)
    x = torch.randn(5, IN)
    with torch.no_grad():
        layer(x)  # fills the cache
        layer.load_state_dict(other.state_dict())  # in-place copies: version counters move
        with reference_paths():
            expected = other(x)
        _assert_close(layer(x), expected)
    assert set(layer.state_dict()) == set(other.state_dict())


def test_tsvd_cache_follows_new_factors_and_leaves_autograd_alone():
    layer = _layer("tsvd", {"max_rank": 8}).eval()
    x = torch.randn(5, IN, requires_grad=True)
    with torch.inference_mode():
        layer(x)  # cached under inference mode
    layer.set_factors(-layer.u.float(), layer.s, layer.v.float())
    layer(x).sum().backward()  # a cached inference tensor here would fail to save for backward
    with reference_paths():
        expected = layer(x)
    _assert_close(layer(x), expected)


def test_cached_builds_once_per_state():
    module, source, calls = torch.nn.Module(), torch.ones(3), []
    build = lambda: calls.append(1) or source * 2  # noqa: E731
    cached(module, "double", (source,), build)
    cached(module, "double", (source,), build)
    assert len(calls) == 1
    source.add_(1)
    assert torch.equal(cached(module, "double", (source,), build), torch.full((3,), 4.0))
    assert len(calls) == 2


def test_quantize_rows_round_trip_error_is_half_a_step():
    x = torch.randn(50, 33) * torch.logspace(-3, 3, 50)[:, None]
    codes, scale = quantize_rows(x)
    assert codes.dtype == torch.int8 and codes.abs().max() <= 127
    assert ((codes.float() * scale - x).abs() <= scale / 2 * (1 + 1e-5)).all()


def test_int8_matmul_within_activation_rounding_bound():
    """``|x_q W - x W| <= (step / 2) sum_k |W_kj|`` per row, ``step`` the row's quantization step."""
    torch.manual_seed(1)
    x, codes = torch.randn(40, 48), torch.randint(-3, 4, (48, 24), dtype=torch.int8)
    col_scale = torch.rand(1, 24) + 0.5
    exact = x @ (codes.float() * col_scale)
    _, step = quantize_rows(x)
    bound = step / 2 * (codes.float().abs() * col_scale).sum(0) + 1e-4 * exact.abs().max()
    assert ((int8_matmul(x, codes, col_scale) - exact).abs() <= bound).all()


@pytest.mark.parametrize("name,options", [("tsvd", {"max_rank": 8}), ("tsvd", {}), ("svdq", {})])
def test_int8_activation_paths_are_opt_in_and_close(name, options):
    layer = _layer(name, options).eval()
    x = torch.randn(30, IN)
    with torch.no_grad():
        with reference_paths():
            ref = layer(x)
        assert set_int8_activations(layer) == 1
        approx = layer(x)
    # two roundings to 1/254 of a row's largest entry; on Gaussian rows that is ~1% relative error
    assert 0 < ((approx - ref).norm() / ref.norm()).item() < 0.03


def test_int8_paths_skip_what_they_cannot_take():
    layer = _layer("svdq", {"group_size": 16}).eval()  # several scales per row: no single integer matmul
    set_int8_activations(layer)
    x = torch.randn(9, IN)
    with torch.no_grad(), reference_paths():
        ref = layer(x)
    _assert_close(layer(x), ref)


def test_hyper_keep_encoded_decodes_per_call():
    layer = _layer("hyper", {})
    x = torch.randn(4, IN)
    expected = layer(x)
    layer.keep_encoded_()
    assert layer.weight.numel() == 0
    assert torch.equal(layer(x), expected)
    layer.load_state_dict(layer.state_dict())
    assert layer.weight.numel() == 0
    layer.keep_encoded_(False)
    assert layer.weight.shape == (OUT, IN) and torch.equal(layer(x), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,options", CASES)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fast_paths_equal_reference(name, options, dtype):
    layer = _layer(name, options).cuda().to(dtype).eval()
    x = torch.randn(64, IN, device="cuda", dtype=dtype)
    with torch.no_grad():
        with reference_paths():
            ref = layer(x).float()
        fast = layer(x).float()
    # half precision: each path rounds its intermediates to 8 (bf16) or 11 (fp16) bits
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(fast, ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_int8_matmul_within_activation_rounding_bound():
    x = torch.randn(64, 48, device="cuda")
    codes = torch.randint(-3, 4, (48, 24), dtype=torch.int8, device="cuda")
    exact = x @ codes.float()
    _, step = quantize_rows(x)
    bound = step / 2 * codes.float().abs().sum(0) + 1e-4 * exact.abs().max()
    assert ((int8_matmul(x, codes, torch.ones(1, 24, device="cuda")) - exact).abs() <= bound).all()


def test_clear_caches_frees_and_rebuilds():
    model = torch.nn.Sequential(_layer("svdq", {}), torch.nn.ReLU(), _layer("tsvd", {}, shape=(IN, OUT))).eval()
    x = torch.randn(3, IN)
    with torch.no_grad():
        before = model(x)
        assert clear_caches(model) == 2
        assert clear_caches(model) == 0
        assert torch.equal(model(x), before)


def test_int8_factors_pad_rank_without_changing_the_product():
    torch.manual_seed(2)
    v, u = torch.randint(-5, 6, (5, 24), dtype=torch.int8), torch.randint(-5, 6, (16, 5), dtype=torch.int8)
    v_scale, u_scale = torch.rand(5) + 0.1, torch.rand(16) + 0.1
    v_t, v_row, u_t, u_row = int8_factors(v, v_scale, u, u_scale)
    assert v_t.shape == (24, 8) and u_t.shape == (8, 16) and v_row.shape == (1, 8)
    x = torch.randn(9, 24)
    padded = int8_matmul(int8_matmul(x, v_t, v_row), u_t, u_row)
    plain = int8_matmul(int8_matmul(x, v.t(), v_scale[None]), u.t(), u_scale[None])
    torch.testing.assert_close(padded, plain, rtol=1e-6, atol=1e-6 * plain.abs().max().item())


@pytest.mark.parametrize("name,options", [("tsvd", {"max_rank": 8}), ("svdq", {})])
def test_int8_paths_leave_gradients_to_the_float_path(name, options):
    layer = _layer(name, options).eval()
    set_int8_activations(layer)
    x = torch.randn(6, IN, requires_grad=True)
    (grad,) = torch.autograd.grad(layer(x).sum(), x)
    with reference_paths():
        (expected,) = torch.autograd.grad(layer(x).sum(), x)
    _assert_close(grad, expected)
