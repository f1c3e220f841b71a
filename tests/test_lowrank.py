"""Low-rank layer: exactness at full rank, Eckart-Young error at lower ranks, counts, whitening."""
import math

import pytest
import torch

from structured_compress.layers import LAYERS, build_layer
from structured_compress.layers.lowrank import LowRankConfig, LowRankLinear, rank_for_budget
from structured_compress.typed_config import OptionError


def random_matrix(m, n, seed=0):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("shape", [(24, 24), (40, 17), (9, 33)])
def test_full_rank_reproduces_dense_outputs(shape):
    m, n = shape
    weight, bias = random_matrix(m, n), random_matrix(1, m, 1)[0]
    layer = LowRankLinear.from_dense(weight, bias, LowRankConfig(budget=1.0, rank=min(m, n)))
    x = random_matrix(5, n, 2).reshape(5, 1, n)
    expected = x @ weight.T + bias
    assert layer.left.dtype == torch.float64
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rank", [1, 3, 7, 15])
def test_truncation_error_is_eckart_young(rank):
    weight = random_matrix(30, 20)
    singular = torch.linalg.svdvals(weight)
    layer = LowRankLinear.from_dense(weight, None, LowRankConfig(rank=rank))
    error = torch.linalg.norm(weight - layer.to_dense_weight())
    torch.testing.assert_close(error, singular[rank:].square().sum().sqrt(), atol=1e-10, rtol=1e-10)


def test_spectral_split_balances_factors():
    weight = random_matrix(16, 12)
    layer = LowRankLinear.from_dense(weight, None, LowRankConfig(rank=5))
    torch.testing.assert_close(layer.left.norm(dim=0), layer.right.norm(dim=1), atol=1e-10, rtol=1e-10)


def test_counts_match_hand_computation():
    # 64x32 at budget 0.25: floor(0.25*64*32/96) = 5; params 5*(64+32) + 64 bias
    layer = build_layer("lowrank", 32, 64, budget=0.25)
    assert layer.rank == 5 == rank_for_budget(0.25, 64, 32)
    assert layer.num_params() == 5 * 96 + 64 == sum(p.numel() for p in layer.parameters())
    assert layer.macs_per_token() == 480
    no_bias = build_layer("lowrank", 32, 64, rank=3, bias=False)
    assert no_bias.num_params() == 3 * 96 and no_bias.macs_per_token() == 288
    dense = build_layer("dense", 32, 64)
    assert dense.num_params() == 64 * 32 + 64 and dense.macs_per_token() == 2048


def test_rank_is_clipped_and_a_budget_below_rank_one_is_an_error():
    assert rank_for_budget(1.0, 100, 3) == 2  # floor(300 / 103): budget 1 never costs more than dense
    with pytest.raises(OptionError, match=r"budget=1e-06: keeps less than one rank-1 component of a 100x100 layer"):
        rank_for_budget(1e-6, 100, 100)


def test_registry_and_bad_budget():
    assert {"dense", "lowrank"} <= set(LAYERS)
    for bad in (0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="budget"):
            LowRankLinear.from_dense(random_matrix(8, 8), None, LowRankConfig(budget=bad))


def test_error_decreases_with_budget():
    weight = random_matrix(48, 40)
    errors = [torch.linalg.norm(weight - LowRankLinear.from_dense(weight, None, LowRankConfig(budget=b))
                                .to_dense_weight()).item() for b in (0.1, 0.25, 0.5, 0.75, 1.0)]
    assert all(a > b for a, b in zip(errors, errors[1:]))


def test_whitened_svd_minimises_output_error_on_calibration_data():
    gen = torch.Generator().manual_seed(3)
    n, m, rank = 20, 16, 4
    mixing = torch.randn(n, n, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    x = torch.randn(500, n, generator=gen, dtype=torch.float64) @ mixing  # correlated, anisotropic inputs
    weight = random_matrix(m, n, 4)
    gram = x.T @ x
    plain = LowRankLinear.from_dense(weight, None, LowRankConfig(rank=rank))
    whitened = LowRankLinear.from_dense(weight, None, LowRankConfig(rank=rank, init="whiten"), gram=gram)
    out_error = lambda layer: torch.linalg.norm(x @ (weight - layer.to_dense_weight()).T).item()
    assert out_error(whitened) < out_error(plain)
    # truncation-aware: the output error equals the tail of the whitened spectrum
    chol = torch.linalg.cholesky(gram)
    tail = torch.linalg.svdvals(weight @ chol)[rank:].square().sum().sqrt().item()
    assert math.isclose(out_error(whitened), tail, rel_tol=1e-8)


def test_whiten_without_calibration_is_a_clear_error():
    with pytest.raises(ValueError, match="calibration"):
        LowRankLinear.from_dense(random_matrix(8, 8), None, LowRankConfig(budget=0.5, init="whiten"))


def test_from_dense_runs_one_svd_and_no_random_init(monkeypatch):
    """The constructor's random init (a dense Kaiming draw + SVD) must not run when pretrained weights
    overwrite it: for large layers it doubled the decomposition time."""
    def no_random_init(self):
        if self.left.device.type != "meta":  # on the meta device it allocates and computes nothing
            raise AssertionError("from_dense ran the random init on real storage")

    monkeypatch.setattr(LowRankLinear, "reset_parameters", no_random_init)
    weight, bias = torch.randn(12, 20, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    layer = LowRankLinear.from_dense(weight, bias, LowRankConfig(rank=12))
    assert layer.left.dtype == torch.float64 and layer.left.device == weight.device
    torch.testing.assert_close(layer.to_dense_weight(), weight)
    torch.testing.assert_close(layer.bias.detach(), bias)
