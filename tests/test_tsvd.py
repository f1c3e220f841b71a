"""Ternary SVD layer: ternary factors, tolerance-driven rank, exact recovery, op counts, QAT."""
import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from src.callbacks.tsvd_qat import TernaryQAT
from src.layers import tsvd
from src.layers.tsvd import TernarySVDLinear, requantize_, ternarize



def decaying_matrix(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(rows, rows, generator=gen))
    q2, _ = torch.linalg.qr(torch.randn(cols, cols, generator=gen))
    k = min(rows, cols)
    return (q1[:, :k] * 0.8 ** torch.arange(k)) @ q2[:, :k].T


def assert_ternary(layer: TernarySVDLinear) -> None:
    for factor in (layer.u, layer.v):
        assert factor.dtype == torch.int8
        assert set(factor.unique().tolist()) <= {-1, 0, 1}


def test_ternarize_keeps_the_sparsest_support_reaching_the_cosine():
    a = torch.tensor([[0.6, -0.5, 0.4, 0.3, 0.2, -0.1]])  # cosines of the top-k supports: .63, .82, .91, ...
    assert ternarize(a, cos_thresh=0.8386).tolist() == [[1.0, -1.0, 1.0, 0.0, 0.0, 0.0]]
    assert ternarize(a, cos_thresh=0.0).tolist() == [[1.0, -1.0, 1.0, 1.0, 1.0, -1.0]]
    unreachable = ternarize(torch.ones(1, 4), cos_thresh=1.5)  # falls back to the best cosine: all entries
    assert unreachable.tolist() == [[1.0, 1.0, 1.0, 1.0]]


def test_factors_are_ternary_and_forward_matches_dense():
    weight, bias = decaying_matrix(40, 28), torch.randn(40)
    layer = TernarySVDLinear.from_dense(weight, bias, tolerance=0.05)  # about 20 components
    assert_ternary(layer)
    x = torch.randn(6, 28)
    assert torch.allclose(layer(x), x @ layer.to_dense_weight().T + bias, atol=1e-5)
    assert layer.fit_error < 0.05
    assert torch.linalg.matrix_norm(layer.to_dense_weight() - weight, 2) / torch.linalg.matrix_norm(weight, 2) < 0.05


def test_error_decreases_as_tolerance_decreases():
    weight = torch.randn(24, 16, generator=torch.Generator().manual_seed(1))
    results = [TernarySVDLinear.from_dense(weight, tolerance=tol) for tol in (0.5, 0.2, 0.05)]
    errors = [r.fit_error for r in results]
    assert errors == sorted(errors, reverse=True) and errors[0] > errors[-1]
    assert all(r.fit_error < tol for r, tol in zip(results, (0.5, 0.2, 0.05)))
    assert [r.rank for r in results] == sorted(r.rank for r in results)


def test_exact_ternary_product_is_recovered():
    # Disjoint supports make the singular vectors the normalised ternary vectors. Supports of size <= 3 are
    # recovered exactly: for size d the policy needs all d entries (sqrt((d-1)/d) < 0.8386), so float noise
    # among the equal magnitudes cannot drop one.
    rows, cols = 20, 16
    supports_u, supports_v = [[0, 3, 4], [6, 7], [9, 12, 13], [15]], [[0, 1, 5], [6, 8, 9], [10, 11], [14, 15]]
    signs = torch.tensor([1.0, -1.0, -1.0])
    t_u, t_v = torch.zeros(rows, 4), torch.zeros(4, cols)
    for i, (su, sv) in enumerate(zip(supports_u, supports_v)):
        t_u[su, i] = signs[: len(su)]
        t_v[i, sv] = signs[: len(sv)].flip(0)
    scales = torch.tensor([4.0, -2.5, 1.5, 0.7])
    weight = (t_u * scales) @ t_v
    layer = TernarySVDLinear.from_dense(weight, tolerance=1e-4, steps=100)  # stride 1
    assert layer.rank == 4 and layer.fit_error < 1e-4
    assert torch.allclose(layer.to_dense_weight(), weight, rtol=1e-4, atol=1e-5)


def test_muls_and_adds_are_counted_separately():
    layer = TernarySVDLinear.from_dense(decaying_matrix(30, 20), tolerance=0.1)
    nnz = int((layer.u != 0).sum() + (layer.v != 0).sum())
    assert layer.muls_per_token() == layer.rank
    assert layer.adds_per_token() == nnz
    assert layer.flops_per_token() == layer.rank + nnz
    assert layer.num_params() == layer.rank * (30 + 20) + layer.rank


def test_budget_caps_the_rank():
    weight = torch.randn(40, 40, generator=torch.Generator().manual_seed(2))
    layer = TernarySVDLinear.from_dense(weight, budget=0.1, tolerance=1e-6)
    assert layer.rank <= tsvd.rank_cap(0.1, 40, 40) and layer.fit_error > 1e-6


def test_randomized_svd_is_deterministic_and_leaves_the_rng_alone(monkeypatch):
    monkeypatch.setattr(tsvd, "EXACT_SVD_MAX_NUMEL", 100)
    weight = decaying_matrix(40, 30)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = TernarySVDLinear.from_dense(weight, tolerance=0.05)
    assert torch.equal(torch.rand(1), expected_next)
    second = TernarySVDLinear.from_dense(weight, tolerance=0.05)
    assert torch.equal(first.u, second.u) and torch.equal(first.s, second.s)


@pytest.mark.parametrize("prune_rate", [math.inf, 3.0])
def test_requantize_tracks_the_latent_weight(prune_rate):
    weight = decaying_matrix(24, 20)
    layer = TernarySVDLinear.from_dense(weight, tolerance=0.05, prune_rate=prune_rate)
    layer.enable_qat()
    x = torch.randn(8, 20)
    loss = layer(x).square().sum()
    loss.backward()
    assert layer.latent_weight.grad is not None and layer.s.grad is None
    with torch.no_grad():
        layer.latent_weight -= 0.05 * layer.latent_weight.grad
    requantize_(layer)
    assert_ternary(layer)
    latent = layer.latent_weight.detach()
    assert torch.equal(layer(x), nn.functional.linear(x, layer.to_dense_weight(), layer.bias))
    error = torch.linalg.matrix_norm(layer.to_dense_weight() - latent, 2) / torch.linalg.matrix_norm(latent, 2)
    assert error < 0.1


class _Regression(pl.LightningModule):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, layer.in_features, generator=gen)
        self.y = torch.randn(64, layer.out_features, generator=gen)

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self.layer(self.x), self.y)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(4, 1), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_ternary_qat_callback_trains_and_leaves_a_deployable_layer():
    layer = TernarySVDLinear.from_dense(decaying_matrix(16, 12), torch.zeros(16), tolerance=0.1)
    before = layer.to_dense_weight().clone()
    module = _Regression(layer)
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[TernaryQAT()])
    trainer.fit(module)
    assert layer.latent_weight is None and "latent_weight" not in layer.state_dict()
    assert_ternary(layer)
    assert not torch.equal(layer.to_dense_weight(), before)
