"""Ternary SVD layer: ternary factors, tolerance-driven rank, exact recovery, op counts, QAT."""
import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from structured_compress.callbacks.tsvd_qat import TernaryQAT
from structured_compress.layers import ternary
from structured_compress.layers.ternary import ternarize
from structured_compress.layers.tsvd import TernarySVDConfig, TernarySVDLinear, requantize_



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
    layer = TernarySVDLinear.from_dense(weight, bias, TernarySVDConfig(tolerance=0.05))  # about 20 components
    assert_ternary(layer)
    x = torch.randn(6, 28)
    assert torch.allclose(layer(x), x @ layer.to_dense_weight().T + bias, atol=1e-5)
    assert layer.fit_error < 0.05
    assert torch.linalg.matrix_norm(layer.to_dense_weight() - weight, 2) / torch.linalg.matrix_norm(weight, 2) < 0.05


def test_error_decreases_as_tolerance_decreases():
    weight = torch.randn(24, 16, generator=torch.Generator().manual_seed(1))
    results = [TernarySVDLinear.from_dense(weight, None, TernarySVDConfig(tolerance=tol)) for tol in (0.5, 0.2, 0.05)]
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
    layer = TernarySVDLinear.from_dense(weight, None, TernarySVDConfig(tolerance=1e-4, steps=100))  # stride 1
    assert layer.rank == 4 and layer.fit_error < 1e-4
    assert torch.allclose(layer.to_dense_weight(), weight, rtol=1e-4, atol=1e-5)


def test_muls_and_adds_are_counted_separately():
    layer = TernarySVDLinear.from_dense(decaying_matrix(30, 20), None, TernarySVDConfig(tolerance=0.1))
    nnz = int((layer.u != 0).sum() + (layer.v != 0).sum())
    assert layer.muls_per_token() == layer.rank
    assert layer.adds_per_token() == nnz
    assert layer.macs_per_token() == layer.rank + nnz
    assert layer.num_params() == layer.rank * (30 + 20) + layer.rank


def test_budget_cap_is_explicit_and_reported_when_it_binds(caplog):
    weight = torch.randn(40, 40, generator=torch.Generator().manual_seed(2))
    capped = TernarySVDLinear.from_dense(weight, None, TernarySVDConfig(budget=0.1, tolerance=1e-2, budget_cap=True))
    assert capped.rank <= ternary.rank_cap(0.1, 40, 40) and capped.tolerance_met is False
    assert "rank cap" in caplog.text
    free = TernarySVDLinear.from_dense(weight, None, TernarySVDConfig(budget=0.1, tolerance=1e-2))  # budget alone
    assert free.rank > ternary.rank_cap(0.1, 40, 40) and free.tolerance_met  # caps nothing


def real_ish_matrix(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A trained-weight-like matrix: a power-law spectrum plus dense noise (no exact low-rank structure)."""
    gen = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(rows, rows, generator=gen))
    q2, _ = torch.linalg.qr(torch.randn(cols, cols, generator=gen))
    k = min(rows, cols)
    spectrum = (1.0 + torch.arange(k)) ** -0.7
    return (q1[:, :k] * spectrum) @ q2[:, :k].T + 0.002 * torch.randn(rows, cols, generator=gen)


@pytest.mark.parametrize("shape,steps", [((64, 112), 20), ((112, 64), 20), ((64, 112), 4)])
def test_tolerance_is_met_and_the_reported_error_is_the_true_spectral_error(shape, steps):
    weight = real_ish_matrix(*shape)
    layer = TernarySVDLinear.from_dense(weight, None, TernarySVDConfig(tolerance=1e-2, steps=steps))
    true_error = (torch.linalg.matrix_norm((layer.to_dense_weight() - weight).double(), ord=2)
                  / torch.linalg.matrix_norm(weight.double(), ord=2)).item()
    assert layer.fit_error == pytest.approx(true_error, rel=1e-4, abs=1e-7)
    assert true_error < 1e-2 and layer.tolerance_met
    assert layer.rank > min(shape)  # the published tolerance needs more components than the matrix's rank


def test_growing_the_scale_system_matches_solving_it_at_once():
    gen = torch.Generator().manual_seed(3)
    target = torch.randn(30, 20, generator=gen)
    t_u, t_v = (torch.randint(-1, 2, (30, 12), generator=gen).float(),
                torch.randint(-1, 2, (12, 20), generator=gen).float())
    grown = ternary.ScaleFit(target, t_u[:, :5], t_v[:5])
    grown.extend(t_u[:, 5:9], t_v[5:9])
    grown.extend(t_u[:, 9:], t_v[9:])
    scales, residual = grown.solve()
    at_once, _ = ternary.fit_scales(target, t_u, t_v)
    assert torch.allclose(scales, at_once, atol=1e-5)
    gram = (t_u.T @ t_u) * (t_v @ t_v.T)
    exact = torch.linalg.solve(gram.double(), ((t_u.T @ target) * t_v).sum(1).double()).float()
    assert torch.allclose(scales, exact, atol=1e-3)  # the damping is negligible on a well-posed system
    assert torch.allclose(residual, target - (t_u * scales) @ t_v)


def test_op_counts_follow_the_paper_columns():
    layer = TernarySVDLinear.from_dense(decaying_matrix(40, 28), torch.randn(40), TernarySVDConfig(tolerance=0.05))
    counts = layer.op_counts()
    assert counts["muls"] == layer.rank
    assert counts["adds"] == int((layer.u != 0).sum() + (layer.v != 0).sum())
    assert counts["ternary_params"] == layer.rank * 68 and counts["float_params"] == layer.rank + 40
    assert counts["bytes"] == layer.storage_bytes() and counts["dense_fp16_bytes"] == 2 * (40 * 28 + 40)


@pytest.mark.parametrize("prune_rate", [math.inf, 3.0])
def test_requantize_tracks_the_latent_weight(prune_rate):
    weight = decaying_matrix(24, 20)
    layer = TernarySVDLinear.from_dense(weight, None, TernarySVDConfig(tolerance=0.05, prune_rate=prune_rate))
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
    layer = TernarySVDLinear.from_dense(decaying_matrix(16, 12), torch.zeros(16), TernarySVDConfig(tolerance=0.1))
    before = layer.to_dense_weight().clone()
    module = _Regression(layer)
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[TernaryQAT()])
    trainer.fit(module)
    assert layer.latent_weight is None and "latent_weight" not in layer.state_dict()
    assert_ternary(layer)
    assert not torch.equal(layer.to_dense_weight(), before)


def test_a_qat_checkpoint_loads_into_the_deployed_layer_with_its_rank():
    """The best checkpoint of a QAT run holds the latent weight and the rank of that step; the layer tested
    after training (QAT off, another rank) loads it and computes exactly what was validated."""
    torch.manual_seed(0)
    weight = torch.randn(24, 16)
    training = TernarySVDLinear.from_dense(weight, torch.zeros(24), TernarySVDConfig(tolerance=0.05))
    training.enable_qat()
    with torch.no_grad():
        training.latent_weight.add_(0.5 * torch.randn_like(weight))
    requantize_(training)
    checkpoint = {k: v.clone() for k, v in training.state_dict().items()}
    deployed = TernarySVDLinear.from_dense(weight, torch.zeros(24), TernarySVDConfig(tolerance=0.3))
    assert deployed.rank != training.rank and "latent_weight" in checkpoint
    deployed.load_state_dict(checkpoint)
    x = torch.randn(5, 16)
    assert deployed.rank == training.rank and deployed.latent_weight is None
    assert torch.equal(deployed.to_dense_weight(), training.to_dense_weight())
    with torch.no_grad():
        assert torch.allclose(deployed(x), x @ training.to_dense_weight().T, atol=1e-5)
    resumed = TernarySVDLinear.from_dense(weight, torch.zeros(24), TernarySVDConfig(tolerance=0.3))
    resumed.enable_qat()  # resuming QAT keeps the latent weight
    resumed.load_state_dict(checkpoint)
    assert torch.equal(resumed.latent_weight, checkpoint["latent_weight"])


@pytest.mark.parametrize("refit_every", [2, 5])
def test_refitting_every_few_steps_still_meets_the_tolerance_with_the_true_error(refit_every):
    weight = real_ish_matrix(64, 112)
    config = TernarySVDConfig(tolerance=1e-2, steps=20, refit_every=refit_every)
    layer = TernarySVDLinear.from_dense(weight, None, config)
    assert_ternary(layer)
    true_error = (torch.linalg.matrix_norm((layer.to_dense_weight() - weight).double(), ord=2)
                  / torch.linalg.matrix_norm(weight.double(), ord=2)).item()
    assert layer.fit_error == pytest.approx(true_error, rel=1e-4, abs=1e-7) and true_error < 1e-2
    # the returned scales are the joint least-squares fit of the returned factors
    joint, _ = ternary.fit_scales(weight, layer.u.float(), layer.v.float())
    assert torch.allclose(layer.s, joint, rtol=1e-4, atol=1e-6)
    assert layer.config()["refit_every"] == refit_every
    with pytest.raises(ValueError, match="refit_every"):
        TernarySVDLinear(4, 4, refit_every=0)


def test_new_scales_fit_only_the_last_components_to_the_residual():
    gen = torch.Generator().manual_seed(4)
    target = torch.randn(20, 16, generator=gen)
    t_u = torch.randint(-1, 2, (20, 7), generator=gen).float()
    t_v = torch.randint(-1, 2, (7, 16), generator=gen).float()
    fit = ternary.ScaleFit(target, t_u[:, :4], t_v[:4])
    _, residual = fit.solve()
    fit.extend(t_u[:, 4:], t_v[4:])
    alone, _ = ternary.fit_scales(residual, t_u[:, 4:], t_v[4:])
    assert torch.allclose(fit.new_scales(residual), alone, atol=1e-5)


def test_cpu_helpers_match_torch():
    gen = torch.Generator().manual_seed(5)
    rows = torch.randn(7, 50, generator=gen)
    assert torch.equal(ternary.sorted_descending(rows), rows.sort(dim=-1, descending=True).values)
    a = torch.randn(30, 45, generator=gen, dtype=torch.float64)
    gram = a @ a.T
    values, vectors = ternary.top_eigenpairs(gram, 6)
    all_values, all_vectors = torch.linalg.eigh(gram)
    assert torch.allclose(values, all_values.flip(0)[:6], rtol=1e-10)
    assert torch.allclose((vectors * all_vectors.flip(1)[:, :6]).sum(0).abs(), torch.ones(6, dtype=torch.float64))
