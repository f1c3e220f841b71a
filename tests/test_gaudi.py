"""Gaudi-GBLR: the published mask formula, its custom gradient, the layer, the structure search, callbacks."""
from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from structured_compress.callbacks.gaudi import GaudiShrink, SigmaAnnealing, WidthMonitor, mean_active_width
from structured_compress.layers import build_layer, get_layer_class
from structured_compress.layers.config import OptionError
from structured_compress.layers.gaudi import GaudiConfig, GaudiGBLRLinear, gaudi_mask
from structured_compress.layers.gaudi.mask import interval_masks, project_widths_, snapped_cost
from structured_compress.layers.gaudi.search import svd_error_at
from structured_compress.layers.gaudi.starts import (alternate_factors_, blocks_start, greedy_intervals,
                                                     longest_circular_run, top_singular_pairs)
from structured_compress.layers.lowrank import LowRankConfig, LowRankLinear
from structured_compress.surgery import compress_


def published_mask(width: np.ndarray, location: np.ndarray, n: int, sigma: float | None) -> np.ndarray:
    """Direct float64 evaluation of the paper's spectrum, then a forward-normalised inverse real FFT."""
    k = np.arange(n // 2 + 1)[None, :]
    w, loc = width[:, None], location[:, None]
    spectrum = w * np.sinc(k * w) / np.sinc(k / n)
    if sigma is not None:
        spectrum = spectrum * np.exp(-k ** 2 / (2 * sigma ** 2))
    spectrum = spectrum * np.exp(1j * (np.pi * k * (1 / n - w) - 2 * np.pi * k * loc))
    return np.fft.irfft(spectrum, n=n, axis=-1, norm="forward")


def circular_indicator(start: int, length: int, n: int) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.float64)
    mask[(start + torch.arange(length)) % n] = 1.0
    return mask


def set_structure(layer: GaudiGBLRLinear, widths, locations) -> None:
    with torch.no_grad():
        layer.widths.copy_(torch.as_tensor(widths, dtype=layer.widths.dtype))
        layer.locations.copy_(torch.as_tensor(locations, dtype=layer.locations.dtype))


# --- the mask ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [7, 8, 33, 64])
@pytest.mark.parametrize("sigma", [None, 0.7, 3.0, 100.0])
def test_mask_matches_published_formula(n, sigma):
    gen = torch.Generator().manual_seed(n)
    width = torch.rand(6, generator=gen, dtype=torch.float64) * 1.2 - 0.1
    location = torch.rand(6, generator=gen, dtype=torch.float64) * 2 - 0.5
    expected = published_mask(width.numpy(), location.numpy(), n, sigma)
    for custom_grad in (False, True):
        got = gaudi_mask(width, location, n, sigma, custom_grad=custom_grad)
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)
    got32 = gaudi_mask(width.float(), location.float(), n, sigma)
    np.testing.assert_allclose(got32.numpy(), expected, atol=1e-4)


@pytest.mark.parametrize("n, sigma", [(9, None), (16, 2.0)])
def test_custom_gradient_matches_autograd(n, sigma):
    gen = torch.Generator().manual_seed(3)
    width = torch.rand(5, generator=gen, dtype=torch.float64, requires_grad=True)
    location = torch.rand(5, generator=gen, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(5, n, generator=gen, dtype=torch.float64)
    auto = torch.autograd.grad((gaudi_mask(width, location, n, sigma) * upstream).sum(), (width, location))
    custom = torch.autograd.grad((gaudi_mask(width, location, n, sigma, custom_grad=True) * upstream).sum(),
                                 (width, location))
    for a, c in zip(auto, custom):
        torch.testing.assert_close(c, a, atol=1e-10, rtol=1e-10)
    assert torch.autograd.gradcheck(lambda w, l: gaudi_mask(w, l, n, sigma, custom_grad=True), (width, location))


def test_full_width_is_all_ones_at_any_location():
    for n in (5, 8, 31):
        location = torch.tensor([0.0, 0.3, 0.77], dtype=torch.float64)
        mask = gaudi_mask(torch.ones(3, dtype=torch.float64), location, n, None)
        torch.testing.assert_close(mask, torch.ones(3, n, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("n", [7, 8, 9, 16])
def test_grid_widths_without_gaussian_give_exact_circular_indicator(n):
    counts = torch.arange(n + 1)
    for start in range(n):
        mask = gaudi_mask(counts.double() / n, torch.full((n + 1,), start / n, dtype=torch.float64), n, None)
        expected = torch.stack([circular_indicator(start, int(c), n) for c in counts])
        torch.testing.assert_close(mask, expected, atol=1e-12, rtol=0)


def test_eval_hard_shrink_and_threshold_give_exact_zeros_outside_blocks():
    layer = GaudiGBLRLinear(40, 24, num_components=3, sigma=None)
    # component 0: columns 30..39 + 0..4 (wraps), rows 6..13; component 1 is one column wide; 2 is a full row block
    set_structure(layer, [[15 / 40, 1 / 40, 1.0], [8 / 24, 5 / 24, 1.0]], [[30 / 40, 0.5, 0.0], [6 / 24, 0.1, 0.0]])
    layer.eval()
    mask_in, mask_out = layer.component_masks()
    inside_in, inside_out = circular_indicator(30, 15, 40).bool(), circular_indicator(6, 8, 24).bool()
    assert torch.all(mask_in[0][~inside_in] == 0) and torch.all(mask_out[0][~inside_out] == 0)
    torch.testing.assert_close(mask_in[0][inside_in], torch.ones(15, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.all(mask_in[1] == 0)  # one element wide: hard-shrunk away in eval
    layer.train()
    assert mask_in.shape == (3, 40) and layer.component_masks()[0][1].abs().max() > 0.5


# --- the layer ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compute_mode", ["dense", "lr", "compact", "auto"])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_dense_weight_for_any_batch_shape(compute_mode, bias):
    torch.manual_seed(0)
    layer = build_layer("gaudi", 12, 10, compute_mode=compute_mode, bias=bias, rank_per_component=2,
                        width_init="unif")
    for mode in ("train", "eval"):
        getattr(layer, mode)()
        weight = layer.to_dense_weight()
        for shape in [(12,), (5, 12), (2, 3, 12), (2, 1, 3, 12)]:
            x = torch.randn(*shape)
            expected = x @ weight.T + (layer.bias if bias else 0)
            torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_half_precision_weights_keep_float32_structure():
    torch.manual_seed(0)
    layer = GaudiGBLRLinear(16, 8, width_init="unif").to(torch.bfloat16)
    assert layer.in_factors.dtype == torch.bfloat16 and layer.widths.dtype == torch.float32
    out = layer(torch.randn(3, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().sum().backward()
    assert layer.widths.grad is not None and layer.in_factors.grad is not None
    assert set(layer.structural_parameters()) == {"widths", "locations"}


def test_num_params_and_flops_by_hand():
    layer = GaudiGBLRLinear(10, 6, rank_per_component=2, num_components=3, bias=True, sigma=None)
    assert layer.num_params() == 3 * (2 * (10 + 6) + 4) + 6
    # block 0: 4 cols x 3 rows -> min(2*7, 12) = 12; block 1: all 10 cols x 6 rows -> min(2*16, 60) = 32;
    # block 2: 1 col wide -> inactive (0); rounding: 0.42*10 -> 4 columns
    set_structure(layer, [[0.42, 1.0, 0.1], [0.5, 1.0, 1.0]], [[0.9, 0.0, 0.3], [0.5, 0.2, 0.0]])
    assert layer.macs_per_token() == 12 + 32
    layer.eval()
    assert layer.macs_per_token() == 12 + 32
    lowrank_pattern = GaudiGBLRLinear(32, 32, num_components=8, width_init="lr0.5", sigma=None)
    assert lowrank_pattern.macs_per_token() == 4 * (32 + 32)


def test_width_inits():
    layer = GaudiGBLRLinear(32, 16, width_init="splr0.5", location_init="linspace")
    assert layer.num_components == 16
    torch.testing.assert_close(layer.widths.mean(), torch.tensor(0.5))
    torch.testing.assert_close(layer.locations[0], torch.arange(16) / 16)
    lr = GaudiGBLRLinear(32, 16, width_init="lr0.25")
    assert torch.all(lr.widths[:, :4] == 1) and lr.widths[0, 4] == 1 / 32 and lr.widths[1, 4] == 0
    budgeted = GaudiGBLRLinear(32, 32, budget=0.25)
    assert budgeted.macs_per_token() == 4 * 64
    with pytest.raises(ValueError, match="width_init"):
        GaudiGBLRLinear(8, 8, width_init="rand")


# --- structure search --------------------------------------------------------------------------------------

def test_longest_circular_run_edge_cases():
    def run(bits):
        return longest_circular_run(torch.tensor(bits, dtype=torch.bool))
    assert run([0, 1, 1, 1, 0, 0]) == (1, 3)  # the reference reported start 2 here
    assert run([1, 1, 0, 0, 0, 1, 1]) == (5, 4)  # odd length, wraps around
    assert run([1, 0, 1, 0, 1]) == (4, 2)
    assert run([0, 1, 0, 1, 0]) == (1, 1)  # tie: smallest start
    assert run([1] * 5) == (0, 5) and run([0] * 5) == (0, 0)


def test_width_projection_bounds_the_snapped_cost_of_live_components():
    widths = torch.tensor([[1.2, 0.5, 0.1, 0.0], [0.9, 0.3, -0.2, 0.05]])
    project_widths_(widths, (10, 30), 20.0)  # (input, output) axis lengths
    assert widths.min() >= 0 and widths.max() <= 1
    assert float(snapped_cost(widths, (10, 30))) <= 20.0
    assert float(snapped_cost(widths + 0.05, (10, 30))) > 20.0  # the smallest cut: a little less is over budget
    torch.testing.assert_close(widths[0, 0] - widths[0, 1], torch.tensor(0.5))  # the same fraction off each
    # by hand: cells round(w N), a component counts only when both axes have more than one cell
    assert float(snapped_cost(torch.tensor([[0.5, 0.1, 0.3], [0.2, 0.9, 0.02]]), (10, 30))) == 5 + 6 + 0
    cheap = torch.tensor([[0.1, 0.2], [0.1, 0.0]])
    project_widths_(cheap, (10, 30), 20.0)  # already within budget: unchanged
    torch.testing.assert_close(cheap, torch.tensor([[0.1, 0.2], [0.1, 0.0]]))


def test_lowrank_start_is_the_truncated_svd_at_the_budget():
    torch.manual_seed(0)
    weight, bias = torch.randn(20, 14), torch.randn(20)
    layer = GaudiGBLRLinear.from_dense(weight, bias, GaudiConfig(budget=0.5, starts=["lowrank"]))
    rank = 14 * 20 // 2 // 34  # floor(budget m n / (m + n))
    lowrank = LowRankLinear.from_dense(weight, bias, LowRankConfig(rank=rank))
    assert layer.num_components == rank and torch.all(layer.widths == 1)
    for mode in (layer.train, layer.eval):
        mode()
        torch.testing.assert_close(layer.to_dense_weight(), lowrank.to_dense_weight(), atol=1e-5, rtol=1e-5)
    x = torch.randn(3, 14)
    torch.testing.assert_close(layer(x), lowrank(x), atol=1e-4, rtol=1e-4)


def test_given_full_widths_are_cut_to_the_budget_before_refinement():
    torch.manual_seed(0)  # the reference's find_mask=False path: full widths at random locations
    weight = torch.randn(20, 14)
    config = GaudiConfig(budget=0.5, num_components=5, starts=["given"], niter=0)
    layer = GaudiGBLRLinear.from_dense(weight, None, config)
    assert 0 < layer.macs_per_token() <= 0.5 * weight.numel()


def relative_error(layer: GaudiGBLRLinear, weight: torch.Tensor) -> float:
    layer.eval()
    return float((layer.to_dense_weight() - weight).norm() / weight.norm())


def test_from_dense_error_decreases_with_budget_and_respects_it():
    torch.manual_seed(0)
    weight = torch.randn(24, 20)
    errors = []
    for budget in (0.15, 0.3, 0.6):
        layer = GaudiGBLRLinear.from_dense(weight, None, GaudiConfig(budget=budget))
        errors.append(relative_error(layer, weight))
        assert layer.macs_per_token() <= 1.1 * budget * weight.numel()
    assert errors[0] > errors[1] > errors[2]


def rolled_block_diagonal(blocks: int = 4, size: int = 8, shift: int = 3) -> torch.Tensor:
    """Rank-1 diagonal blocks (factor entries bounded away from 0), rows rolled so the last block wraps."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.zeros(blocks * size, blocks * size)
    for block in range(blocks):
        u, v = [(torch.rand(size, generator=gen) + 0.5) * torch.sign(torch.randn(size, generator=gen))
                for _ in range(2)]
        weight[block * size:(block + 1) * size, block * size:(block + 1) * size] = torch.outer(u, v)
    return weight.roll(shift, 0)


def test_greedy_search_finds_block_intervals_including_wrapped_ones():
    weight = rolled_block_diagonal()
    widths, locations = greedy_intervals(weight, weight.numel(), 32, 0.1, 0.1, filter_std=0.3)
    live = widths.prod(0) > 0
    found = {(round(float(c) * 32), round(float(r) * 32)) for c, r in locations[:, live].T}
    assert found == {(0, 3), (8, 11), (16, 19), (24, 27)}  # (column start, row start); rows 27..31,0..2 wrap
    assert live.all() and torch.all(widths == 8 / 32)  # 32 blocks of cost 16 fit in the budget


def test_from_dense_is_never_worse_than_lowrank_at_the_same_budget():
    weight = rolled_block_diagonal()
    layer = GaudiGBLRLinear.from_dense(weight, None, GaudiConfig(budget=0.15))
    lowrank = LowRankLinear.from_dense(weight, None, LowRankConfig(budget=0.15))
    lowrank_error = float((lowrank.to_dense_weight() - weight).norm() / weight.norm())
    assert relative_error(layer, weight) <= lowrank_error + 1e-5
    assert layer.macs_per_token() <= 0.15 * weight.numel()
    eval_weight = layer.to_dense_weight()
    layer.train()  # no component lives only in training mode
    torch.testing.assert_close(layer.to_dense_weight(), eval_weight)


def planted_blocks(seed: int = 0, noise: float = 0.01) -> tuple[torch.Tensor, float]:
    """A 48x64 matrix: 2 full-size rank-1 terms plus one rank-1 term in each of the 2x2 tiles (the ``blocks``
    start's search space), and small noise; returns it and the MACs of that exact structure."""
    gen = torch.Generator().manual_seed(seed)
    weight = sum(torch.outer(torch.randn(48, generator=gen), torch.randn(64, generator=gen)) for _ in range(2))
    for rows in (slice(0, 24), slice(24, 48)):
        for cols in (slice(0, 32), slice(32, 64)):
            weight[rows, cols] += torch.outer(torch.randn(24, generator=gen), torch.randn(32, generator=gen))
    return weight + noise * torch.randn(48, 64, generator=gen), 2 * (48 + 64) + 4 * (24 + 32)


def test_init_beats_svd_on_planted_blocks_at_equal_flops():
    weight, flops = planted_blocks()
    budget = flops / weight.numel()
    layer = GaudiGBLRLinear.from_dense(weight, None, GaudiConfig(budget=budget))
    layer.eval()
    error = float((layer.to_dense_weight() - weight).norm() / weight.norm())
    svd = svd_error_at(torch.linalg.svdvals(weight.double()), layer.macs_per_token(), tuple(weight.shape))
    assert layer.macs_per_token() <= flops and layer.init_report.start == "blocks"
    assert error < 0.05 < svd  # the planted structure is found (noise level ~0.01), the SVD cannot express it
    assert layer.init_report.rel_error == pytest.approx(error, rel=1e-4)
    assert layer.init_report.svd_error == pytest.approx(svd, rel=1e-4)


def test_svd_error_at_interpolates_between_ranks():
    singular = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14; (m + n) = 10 MACs per rank
    assert svd_error_at(singular, 10.0, (4, 6)) == pytest.approx((5 / 14) ** 0.5)
    assert svd_error_at(singular, 15.0, (4, 6)) == pytest.approx((3 / 14) ** 0.5)
    assert svd_error_at(singular, 30.0, (4, 6)) == 0.0


def test_top_singular_pairs_match_svd():
    weight = torch.randn(30, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for matrix in (weight, weight.T):
        u, s, vh = top_singular_pairs(matrix, 5)
        torch.testing.assert_close(s, torch.linalg.svdvals(matrix)[:5])
        lowrank = LowRankLinear.from_dense(matrix, None, LowRankConfig(rank=5))
        torch.testing.assert_close((u * s) @ vh, lowrank.to_dense_weight())


def test_alternating_least_squares_never_raises_the_error_and_keeps_the_structure():
    weight, flops = planted_blocks(noise=0.3)
    spectrum = top_singular_pairs(weight, 48)
    start, predicted = blocks_start(weight, spectrum, 0.8 * flops, 48)
    mask_in, mask_out = interval_masks(start.widths, start.locations, (64, 48))
    before = float((start.out_factors.T @ start.in_factors - weight).norm() / weight.norm())
    assert before == pytest.approx(predicted, rel=1e-4)
    errors = []
    for _ in range(3):
        alternate_factors_(start, weight, 1)
        errors.append(float((start.out_factors.T @ start.in_factors - weight).norm() / weight.norm()))
        assert torch.all(start.out_factors[~mask_out] == 0) and torch.all(start.in_factors[~mask_in] == 0)
    assert before >= errors[0] - 1e-6 and errors[0] >= errors[1] - 1e-6 >= errors[2] - 2e-6 and errors[2] < before


STARTS_GRID = [["blocks"], ["blocks", "greedy"], ["blocks", "lowrank"], ["blocks", "greedy", "lowrank"], ["given"],
               ["given", "greedy"], ["given", "lowrank"], ["given", "greedy", "lowrank"],
               ["blocks", "greedy", "lowrank", "given"]]
OPTION_GRID = [dict(starts=starts, drop_empty=drop, num_components=k)
               for starts in STARTS_GRID for drop in (False, True) for k in (None, 6)]


def short_search(starts: list[str]) -> dict:
    """Few sweeps/steps, and low greedy thresholds, for the start kinds that read them."""
    options = {"sweeps": 1} if "blocks" in starts else {}
    if {"greedy", "given"} & set(starts):
        options["niter"] = 3
    if "greedy" in starts:
        options.update(row_thresholds=[0.5], col_thresholds=[0.5])
    return options


@pytest.mark.parametrize("options", OPTION_GRID, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_budget_holds_for_every_from_dense_option(options):
    weights = [torch.randn(24, 20, generator=torch.Generator().manual_seed(2)), planted_blocks()[0]]
    for weight in weights:
        for budget in (0.1, 0.3, 0.7):
            config = GaudiConfig(budget=budget, **options, **short_search(options["starts"]))
            layer = GaudiGBLRLinear.from_dense(weight, None, config)
            for mode in (layer.eval, layer.train):
                mode()
                assert layer.macs_per_token() <= budget * weight.numel()


def test_unknown_start_is_rejected():
    with pytest.raises(OptionError, match=r"starts=\[svd\]: expected a non-empty list of one of blocks"):
        GaudiConfig(budget=0.5, starts=["svd"])


def test_surgery_and_bfloat16_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4, bias=False)).to(torch.bfloat16)
    report = compress_(model, "gaudi", 0.5, options={"sweeps": 2})
    assert get_layer_class("gaudi") is GaudiGBLRLinear and len(report.layers) == 2
    assert isinstance(model[0], GaudiGBLRLinear) and model[0].in_factors.dtype == torch.bfloat16
    assert model[2].bias is None and model(torch.randn(2, 16, dtype=torch.bfloat16)).shape == (2, 4)


# --- callbacks ---------------------------------------------------------------------------------------------

class TinyGaudiModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = GaudiGBLRLinear(16, 16, num_components=8, width_init=0.9, sigma=None)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum() * 0.0  # no gradient: the widths move by the shrink step only

    def configure_optimizers(self):
        structure = list(self.layer.structural_parameters().values())
        return torch.optim.SGD([{"params": [self.layer.in_factors, self.layer.out_factors, self.layer.bias], "lr": 0.0},
                                {"params": structure, "lr": 0.05, "name": "structure"}])


def test_gaudi_shrink_reaches_target_and_stops():
    torch.manual_seed(0)
    module = TinyGaudiModule()
    shrink = GaudiShrink(thres=1.0, mode="targeted", target_width=0.5, freeze=True)
    sigma = SigmaAnnealing(start_sigma=1.0, end_sigma=9.0, start_epoch=0, end_epoch=4)
    trainer = pl.Trainer(max_steps=40, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[shrink, sigma, WidthMonitor(every_n_steps=5)])
    data = torch.utils.data.DataLoader(torch.randn(40, 16), batch_size=4)
    trainer.fit(module, data)
    widths, locations = module.layer.widths.detach(), module.layer.locations.detach()
    mean_width = mean_active_width([module.layer])
    assert 0.5 - 0.05 - 1e-6 <= mean_width < 0.5  # shrinks by 0.05 a step and stops once below the target
    assert widths.min() >= 0 and widths.max() <= 1
    assert locations.min() >= 0 and locations.max() < 1
    assert shrink.frozen and not module.layer.widths.requires_grad and not module.layer.locations.requires_grad
    assert float(module.layer.sigma) == 7.0  # 10 batches an epoch: epochs 0..3 ran, sigma(3) = 1 + 8 * 3/4
    assert 0 < float(trainer.callback_metrics["gaudi/macs_fraction"]) < 1


def test_shrink_schedules_and_sigma_ramp():
    adaptive = GaudiShrink(thres=0.04, mode="adaptive", init_thres=0.2, target_width=0.3, start_epoch=2, end_epoch=4)
    def at(epoch, batch):
        return SimpleNamespace(current_epoch=epoch, num_training_batches=10), batch
    assert adaptive.threshold(*at(0, 5), mean_width=0.9) == 0.2
    assert adaptive.threshold(*at(3, 0), mean_width=0.9) == pytest.approx(0.2 + (0.04 - 0.2) * 0.5)
    assert adaptive.threshold(*at(4, 0), mean_width=0.9) == 0.04
    assert adaptive.threshold(*at(5, 0), mean_width=0.2) == 0.0  # below the target: no shrinking
    continuous = GaudiShrink(thres=0.1, target_width=0.5, cont=True, power=2.0)
    assert continuous.threshold(*at(0, 0), mean_width=0.75) == pytest.approx(0.1 * 0.5 ** 2)
    assert GaudiShrink(thres=0.1, mode="plain", target_width=0.5).threshold(*at(0, 0), mean_width=0.1) == 0.1
    ramp = SigmaAnnealing(start_sigma=1.0, end_sigma=100.0, start_epoch=5, end_epoch=300)
    assert [ramp.sigma_at(e, 300) for e in (0, 5, 300, 310)] == [1.0, 1.0, 100.0, 100.0]
    assert ramp.sigma_at(152, 300) == pytest.approx(1 + 99 * 147 / 295)


# --- saving ------------------------------------------------------------------------------------------------

def test_config_rebuilds_the_state_layout_without_decomposing():
    torch.manual_seed(0)
    layer = GaudiGBLRLinear.from_dense(torch.randn(12, 20), torch.randn(12),
                                       GaudiConfig(budget=0.4, sweeps=1, sigma=2.0, compute_mode="lr"))
    rebuilt = type(layer)(layer.in_features, layer.out_features, **layer.config())
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in layer.state_dict().items()}
    rebuilt.load_state_dict(layer.state_dict())
    x = torch.randn(4, 20)
    for mode in ("train", "eval"):
        getattr(layer, mode)(), getattr(rebuilt, mode)()
        assert torch.equal(rebuilt(x), layer(x))


def test_save_and_load_compressed_round_trip_is_bit_exact(tmp_path):
    from structured_compress import load_compressed, save_compressed

    def model():
        return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.Flatten(), nn.Linear(6 * 16, 10), nn.ReLU(),
                             nn.Linear(10, 5, bias=False))

    torch.manual_seed(0)
    compressed = model().eval()
    compress_(compressed, "gaudi", 0.5, options={"sweeps": 1})
    save_compressed(compressed, tmp_path / "gaudi")
    loaded = load_compressed(tmp_path / "gaudi", model().eval())
    x = torch.randn(3, 2, 4, 4)
    assert not any(module.training for module in loaded.modules())  # the skeleton's mode, structured layers too
    for mode in ("train", "eval"):
        getattr(loaded, mode)(), getattr(compressed, mode)()
        assert torch.equal(loaded(x), compressed(x))
    for key, value in compressed.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value) and loaded.state_dict()[key].dtype == value.dtype


def scripted_trainer(lrs, names=None, epoch: int = 0):
    """A trainer stand-in with one SGD optimizer whose groups have the given lrs (and names)."""
    params = [nn.Parameter(torch.zeros(1)) for _ in lrs]
    groups = [{"params": [p], "lr": lr, **({"name": names[i]} if names else {})}
              for i, (p, lr) in enumerate(zip(params, lrs))]
    return SimpleNamespace(optimizers=[torch.optim.SGD(groups)], current_epoch=epoch, num_training_batches=10)


def widths_module(widths) -> nn.Module:
    module = nn.Module()
    module.layer = GaudiGBLRLinear(10, 10, num_components=len(widths[0]), sigma=None)
    set_structure(module.layer, widths, [[0.0] * len(widths[0])] * 2)
    return module


def test_shrink_lr_comes_from_the_last_group_or_the_named_one():
    module = widths_module([[0.8, 0.6], [0.8, 0.6]])
    trainer = scripted_trainer([1.0, 0.1, 0.2], names=["decay", "structure", "no_decay"])
    GaudiShrink(thres=0.5, mode="plain").on_train_batch_end(trainer, module, None, None, 0)
    torch.testing.assert_close(module.layer.widths, torch.tensor([[0.7, 0.5], [0.7, 0.5]]))  # 0.5 * lr 0.2
    GaudiShrink(thres=0.5, mode="plain", param_group="structure").on_train_batch_end(trainer, module, None, None, 0)
    torch.testing.assert_close(module.layer.widths, torch.tensor([[0.65, 0.45], [0.65, 0.45]]))
    with pytest.raises(ValueError, match="param_group"):
        GaudiShrink(thres=0.5, param_group="widths").on_train_batch_end(trainer, module, None, None, 0)


@pytest.mark.parametrize("shrink", [GaudiShrink(thres=0.0, freeze=True),
                                    GaudiShrink(thres=0.3, mode="adaptive", init_thres=0.0, start_epoch=2,
                                                end_epoch=2, freeze=True)])
def test_shrink_freezes_the_structure_as_soon_as_the_step_is_zero(shrink):
    module = widths_module([[0.8, 0.6], [0.8, 0.6]])  # far above any target: only a zero step stops it
    shrink.on_train_batch_end(scripted_trainer([0.1]), module, None, None, 0)
    assert shrink.frozen and not module.layer.widths.requires_grad and not module.layer.locations.requires_grad


def test_mean_shrink_moves_every_width_by_the_mean_excess_until_the_target():
    module = widths_module([[0.9, 0.5, 0.0], [0.7, 0.1, 0.4]])  # component 2 is dead: mean counts 0.9..0.1 only
    shrink = GaudiShrink(mode="mean", target_width=0.2, mean_step=0.5, rate=2)
    trainer = scripted_trainer([0.1])
    shrink.on_train_batch_end(trainer, module, None, None, 0)  # rate 2: batch 0 is skipped
    assert mean_active_width([module.layer]) == pytest.approx(2.2 / 6)
    shrink.on_train_batch_end(trainer, module, None, None, 1)
    step = 0.5 * (2.2 / 6 - 0.2)
    expected = (torch.tensor([[0.9, 0.5, 0.0], [0.7, 0.1, 0.4]]) - step).clamp(0, 1)
    torch.testing.assert_close(module.layer.widths, expected)
    for batch in range(3, 200, 2):
        shrink.on_train_batch_end(trainer, module, None, None, batch)
    assert 0.2 <= mean_active_width([module.layer]) < 0.2 + 1e-3  # approaches the target from above
    with pytest.raises(ValueError, match="target_width"):
        GaudiShrink(mode="mean")


# --- convolutions ------------------------------------------------------------------------------------------

def test_conv_flattens_kernels_kernel_position_first_as_the_reference():
    from structured_compress.layers.conv import StructuredConv2d, kernel_as_matrix

    gen = torch.Generator().manual_seed(0)
    layer = GaudiGBLRLinear(12, 2, num_components=1, sigma=None, bias=False)  # C_i = 3, 2x2 kernel
    u, v = torch.randn(2, generator=gen), torch.randn(12, generator=gen)
    with torch.no_grad():
        layer.out_factors.copy_(u.view(1, 2, 1))
        layer.in_factors.copy_(v.view(1, 1, 12))
    set_structure(layer, [[3 / 12], [1.0]], [[3 / 12], [0.0]])  # columns 3..5, all rows
    conv = StructuredConv2d.from_conv(nn.Conv2d(3, 2, 2, padding=1, bias=False), layer)
    # by hand: columns 3..5 in (k_h, k_w, C_i) order are channels 0, 1, 2 at kernel position (0, 1)
    kernel = torch.zeros(2, 3, 2, 2)
    kernel[:, :, 0, 1] = torch.outer(u, v[3:6])
    x = torch.randn(2, 3, 5, 4, generator=gen)
    for mode in ("train", "eval"):
        getattr(conv, mode)()
        torch.testing.assert_close(conv.to_dense_weight(), kernel)
        torch.testing.assert_close(conv(x), F.conv2d(x, kernel, padding=1))
    assert torch.equal(kernel_as_matrix(kernel, "kernel"), layer.to_dense_weight())
    assert not torch.equal(kernel_as_matrix(kernel, "channel"), layer.to_dense_weight())  # the project's old order


def test_surgery_decomposes_conv_kernels_in_the_layer_types_order():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, stride=2))
    dense_kernel = model[0].weight.detach().clone()
    report = compress_(model, "gaudi", 0.6, options={"sweeps": 2})
    wrapped = model[0]
    assert wrapped.column_order == "kernel"
    error = float((wrapped.to_dense_weight() - dense_kernel).norm() / dense_kernel.norm())
    assert report.layers[0].rel_error == pytest.approx(error, rel=1e-5)
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(wrapped(x), F.conv2d(x, wrapped.to_dense_weight(), wrapped.linear.bias, stride=2,
                                                    padding=1), atol=1e-5, rtol=1e-5)


def test_keeping_empty_components_pads_to_the_reference_slot_count():
    weight = torch.randn(20, 14, generator=torch.Generator().manual_seed(0))
    layer = GaudiGBLRLinear.from_dense(weight, None, GaudiConfig(budget=0.5, starts=["lowrank"], drop_empty=False))
    assert layer.num_components == 14 and torch.all(layer.widths[:, 4:] == 0)  # rank floor(140 / 34) = 4
    assert mean_active_width([layer]) == pytest.approx(4 / 14)  # what MeanShrink sees, as in the reference
    dropped = GaudiGBLRLinear.from_dense(weight, None, GaudiConfig(budget=0.5, starts=["lowrank"]))
    layer.eval(), dropped.eval()
    torch.testing.assert_close(layer.to_dense_weight(), dropped.to_dense_weight())


# --- compact forward ---------------------------------------------------------------------------------------

def intervals_layer(compute_mode: str, rank: int = 2) -> GaudiGBLRLinear:
    """6 components on a 20 -> 12 layer: shared, wrapped, full and dead intervals."""
    torch.manual_seed(0)
    layer = GaudiGBLRLinear(20, 12, rank_per_component=rank, num_components=6, sigma=None, compute_mode=compute_mode)
    set_structure(layer, [[5 / 20, 5 / 20, 8 / 20, 1.0, 3 / 20, 0.0], [4 / 12, 6 / 12, 4 / 12, 3 / 12, 1.0, 0.5]],
                  [[0.0, 0.0, 16 / 20, 0.35, 0.5, 0.1], [10 / 12, 0.5, 10 / 12, 0.0, 0.25, 0.0]])
    return layer


@pytest.mark.parametrize("rank", [1, 2])
def test_compact_forward_equals_the_dense_mask_path(rank):
    compact, reference = intervals_layer("compact", rank), intervals_layer("dense", rank)
    x = torch.randn(2, 3, 20, dtype=torch.float64)
    compact.double(), reference.double()
    compact.eval(), reference.eval()
    assert compact.compact_plan() is not None and len(compact.compact_plan().inputs) == 4  # cols 0..4 shared
    torch.testing.assert_close(compact(x), reference(x), atol=1e-12, rtol=0)
    assert compact.compact_plan().macs == compact.macs_per_token()
    for layer in (compact, reference):  # frozen structure in training: compact, with the same gradients
        layer.train()
        for param in layer.structural_parameters().values():
            param.requires_grad_(False)
    out_c, out_r = compact(x), reference(x)
    assert compact.compact_plan() is not None
    torch.testing.assert_close(out_c, out_r, atol=1e-12, rtol=0)
    grads_c = torch.autograd.grad(out_c.square().sum(), (compact.in_factors, compact.out_factors, compact.bias))
    grads_r = torch.autograd.grad(out_r.square().sum(), (reference.in_factors, reference.out_factors, reference.bias))
    for gc, gr in zip(grads_c, grads_r):
        torch.testing.assert_close(gc, gr, atol=1e-10, rtol=0)


def test_compact_plan_follows_structure_changes_and_is_skipped_while_widths_learn():
    layer = intervals_layer("compact")
    x = torch.randn(4, 20)
    assert layer.compact_plan() is None  # training with learnable widths: the mask path
    layer.eval()
    first = layer.compact_plan()
    with torch.no_grad():
        layer.widths[0, 0] = 10 / 20
    assert layer.compact_plan() is not first
    torch.testing.assert_close(layer(x), x @ layer.to_dense_weight().T + layer.bias, atol=1e-5, rtol=1e-5)
    blurred = GaudiGBLRLinear(20, 12, num_components=3, sigma=5.0, compute_mode="compact").eval()
    assert blurred.compact_plan() is None  # a Gaussian blurs the masks: not intervals


def test_auto_mode_runs_compact_only_when_it_is_cheap():
    weight, _ = planted_blocks(noise=0.0)
    cheap = GaudiGBLRLinear.from_dense(weight, None, GaudiConfig(budget=0.4)).eval()
    assert cheap.compute_mode == "auto" and cheap._chosen_plan() is not None
    many = GaudiGBLRLinear(64, 64, num_components=64, sigma=None, width_init=0.2, location_init="linspace").eval()
    assert many._chosen_plan() is None and many.compact_plan() is not None  # 128 distinct intervals: dense
    wide = GaudiGBLRLinear(64, 64, num_components=64, sigma=None, width_init=1.0, location_init=0.0).eval()
    assert wide._chosen_plan() is None  # full widths cost 2x dense MACs: dense


def test_per_kernel_position_variant_against_a_hand_built_kernel():
    from structured_compress.layers.conv import StructuredConv2d

    gen = torch.Generator().manual_seed(0)
    layer = GaudiGBLRLinear(12, 2, num_components=1, segments=4, sigma=None, bias=False)  # C_i 3, 2x2 kernel
    u, v = torch.randn(4, 2, generator=gen), torch.randn(4, 3, generator=gen)
    with torch.no_grad():
        layer.out_factors.copy_(u[:, :, None])
        layer.in_factors.copy_(v[:, None, :])
    set_structure(layer, [[2 / 3] * 4, [1.0] * 4], [[1 / 3] * 4, [0.0] * 4])  # channels 1, 2 at every position
    conv = StructuredConv2d.from_conv(nn.Conv2d(3, 2, 2, bias=False), layer)
    kernel = torch.zeros(2, 3, 2, 2)
    for position in range(4):  # one C_o x C_i matrix per kernel position
        kernel[:, 1:, position // 2, position % 2] = torch.outer(u[position], v[position, 1:])
    x = torch.randn(2, 3, 4, 5, generator=gen)
    for mode in ("compact", "dense"):
        layer.compute_mode = mode
        for train in (True, False):
            conv.train(train)
            torch.testing.assert_close(conv.to_dense_weight(), kernel)
            torch.testing.assert_close(conv(x), F.conv2d(x, kernel), atol=1e-5, rtol=1e-5)
    assert layer.macs_per_token() == 4 * (2 + 2)


def test_segments_from_dense_holds_the_budget_and_round_trips():
    weight = torch.randn(24, 20, generator=torch.Generator().manual_seed(3))
    for drop_empty in (True, False):
        layer = GaudiGBLRLinear.from_dense(weight, torch.randn(24), GaudiConfig(budget=0.4, segments=2,
                                                                                  drop_empty=drop_empty))
        for train in (True, False):
            layer.train(train)
            assert layer.macs_per_token() <= 0.4 * weight.numel()
        report = layer.init_report
        assert report.rel_error == pytest.approx(relative_error(layer, weight), rel=1e-4)
        rebuilt = GaudiGBLRLinear(20, 24, **layer.config())
        rebuilt.load_state_dict(layer.state_dict())
        rebuilt.eval()
        x = torch.randn(5, 20)
        assert torch.equal(rebuilt(x), layer(x))
        layer.compute_mode = "dense"
        torch.testing.assert_close(rebuilt(x), layer(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(OptionError, match="segments=3: 3 blocks do not divide the 20 input features"):
        GaudiGBLRLinear.from_dense(weight, None, GaudiConfig(budget=0.4, segments=3))


def test_segments_kernel_gives_each_conv_its_kernel_positions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8 * 9, 6))
    compress_(model, "gaudi", 0.5, options={"segments": "kernel", "sweeps": 1})
    assert [model[0].linear.segments, model[1].linear.segments, model[3].segments] == [9, 1, 1]
    assert model(torch.randn(2, 4, 3, 3)).shape == (2, 6)


def test_compact_forward_under_cpu_bf16_autocast_matches_the_dense_mask_path():
    import copy

    torch.manual_seed(0)
    layer = GaudiGBLRLinear.from_dense(torch.randn(48, 32), torch.randn(48), GaudiConfig(budget=0.25)).eval()
    reference = copy.deepcopy(layer)
    layer.compute_mode, reference.compute_mode = "compact", "dense"
    x = torch.randn(5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast, slow = layer(x), reference(x)
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), slow.float(), atol=0.1, rtol=0.05)
