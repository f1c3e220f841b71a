"""Monarch and block-diagonal layers: exact recovery, forward = dense map, counts, budgets, errors."""
import pytest
import torch

from structured_compress.layers import LAYERS
from structured_compress.layers.blockdiag import BlockDiagConfig, BlockDiagLinear
from structured_compress.layers.blockdiag import nblocks_for_budget as blockdiag_nblocks
from structured_compress.layers.config import OptionError
from structured_compress.layers.monarch import MonarchConfig, MonarchLinear, nblocks_for_budget as monarch_nblocks


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def rel_error(approx, target):
    return ((approx - target).norm() / target.norm()).item()


def random_monarch(in_features, out_features, nblocks, seed=0):
    torch.manual_seed(seed)
    return MonarchLinear(in_features, out_features, nblocks=nblocks).double()


def test_both_types_registered():
    assert LAYERS["monarch"] is MonarchLinear and LAYERS["blockdiag"] is BlockDiagLinear


@pytest.mark.parametrize("out_features,in_features,nblocks", [
    (64, 64, 4), (64, 64, 8), (64, 256, 4), (256, 64, 4),  # divisible: square and rectangular
    (50, 70, 3), (70, 50, 3), (37, 91, 5), (91, 37, 6), (5, 17, 4),  # padded: b does not divide m or n
])
def test_monarch_projection_recovers_a_monarch_matrix(out_features, in_features, nblocks):
    ref = random_monarch(in_features, out_features, nblocks)
    weight = ref.to_dense_weight().detach()
    proj = MonarchLinear.from_dense(weight, ref.bias.detach(), MonarchConfig(nblocks=nblocks))
    assert proj.blocks1.shape == ref.blocks1.shape and proj.blocks2.shape == ref.blocks2.shape
    assert rel_error(proj.to_dense_weight(), weight) < 1e-10
    assert torch.equal(proj.bias, ref.bias)


@pytest.mark.parametrize("out_features,in_features,nblocks", [(48, 48, 4), (30, 70, 3), (70, 30, 6)])
def test_monarch_projection_is_locally_optimal_and_idempotent(out_features, in_features, nblocks):
    torch.manual_seed(1)
    target = torch.randn(out_features, in_features, dtype=torch.float64)
    proj = MonarchLinear.from_dense(target, None, MonarchConfig(nblocks=nblocks))
    best = (proj.to_dense_weight() - target).norm()
    for _ in range(10):  # no nearby point of the Monarch set is closer
        other = MonarchLinear(in_features, out_features, nblocks=nblocks, bias=False).double()
        with torch.no_grad():
            other.blocks1.copy_(proj.blocks1 + 1e-3 * torch.randn_like(proj.blocks1))
            other.blocks2.copy_(proj.blocks2 + 1e-3 * torch.randn_like(proj.blocks2))
        assert (other.to_dense_weight() - target).norm() >= best - 1e-12
    again = MonarchLinear.from_dense(proj.to_dense_weight().detach(), None, MonarchConfig(nblocks=nblocks))
    assert rel_error(again.to_dense_weight(), proj.to_dense_weight()) < 1e-10


@pytest.mark.parametrize("layer", [
    lambda: random_monarch(37, 50, 4), lambda: random_monarch(64, 16, 4),
    lambda: BlockDiagLinear(37, 50, nblocks=4, residual_rank=3).double(),
])
@pytest.mark.parametrize("lead", [(5,), (2, 3), (2, 3, 4)])
def test_forward_equals_dense_map(layer, lead):
    layer = layer()
    with torch.no_grad():
        if isinstance(layer, BlockDiagLinear):
            layer.left.normal_()
    x = torch.randn(*lead, layer.in_features, dtype=torch.float64)
    expected = x @ layer.to_dense_weight().T + layer.bias
    assert layer(x).shape == (*lead, layer.out_features)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_monarch_without_bias_and_float32():
    layer = MonarchLinear(20, 12, nblocks=3, bias=False)
    x = torch.randn(4, 20)
    torch.testing.assert_close(layer(x), x @ layer.to_dense_weight().T)
    assert layer.num_params() == layer.macs_per_token()


@pytest.mark.parametrize("cls", [MonarchLinear, BlockDiagLinear])
def test_error_decreases_as_budget_grows(cls):
    torch.manual_seed(2)
    target = torch.randn(64, 64, dtype=torch.float64)
    errors = [rel_error(cls.from_dense(target, None, cls.Config(budget=budget)).to_dense_weight(), target)
              for budget in (0.1, 0.2, 0.3, 0.5, 1.0)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_monarch_counts_by_hand():
    # 8x8, b=2: p=s=q=4; B1 2x4x4, B2 2x4x4 -> 64 MACs, +8 bias
    layer = MonarchLinear(8, 8, nblocks=2)
    assert (layer.num_params(), layer.macs_per_token()) == (72, 64)
    # n=10, m=6, b=3: p=4, s=2, q=2; B1 3x2x4 = 24, B2 3x2x2 = 12
    layer = MonarchLinear(10, 6, nblocks=3)
    assert (layer.num_params(), layer.macs_per_token()) == (42, 36)
    assert sum(p.numel() for p in layer.parameters()) == layer.num_params()


def test_blockdiag_counts_by_hand():
    # n=10, m=6, b=3: blocks 3x2x4 = 24; residual r=2: 2*(6+10) = 32; bias 6
    layer = BlockDiagLinear(10, 6, nblocks=3, residual_rank=2)
    assert (layer.num_params(), layer.macs_per_token()) == (62, 56)
    assert sum(p.numel() for p in layer.parameters()) == layer.num_params()


def test_monarch_nblocks_rule():
    assert monarch_nblocks(0.5, 768, 768) == 4  # 1536*768 / 294912 = 4
    assert monarch_nblocks(0.25, 768, 768) == 8
    assert monarch_nblocks(1.0, 64, 256) == 2  # b=1 would cost 1.25x dense, so it is raised
    assert monarch_nblocks(0.125, 16, 16) == 16  # clipped to min(m, n): 16 blocks of 1x1 cost 32 = 0.125 of dense
    with pytest.raises(OptionError, match=r"budget=0.1: is below the cheapest Monarch layout of a 16x16 layer \(32 "
                                          r"numbers\); raise layer.budget to at least 0.125,"):
        monarch_nblocks(0.1, 16, 16)  # not a silent overspend


@pytest.mark.parametrize("budget,residual_fraction", [(0.1, 0.0), (0.3, 0.0), (0.5, 0.4), (1.0, 0.25)])
def test_blockdiag_budget_is_respected(budget, residual_fraction):
    layer = BlockDiagLinear(70, 50, budget=budget, residual_fraction=residual_fraction)
    assert layer.macs_per_token() <= budget * 70 * 50
    assert (layer.residual_rank > 0) == (residual_fraction > 0)


def test_blockdiag_exact_on_block_diagonal_matrix():
    torch.manual_seed(3)
    ref = BlockDiagLinear(90, 60, nblocks=7).double()  # padded: 7 does not divide 60 or 90
    weight = ref.to_dense_weight().detach()
    proj = BlockDiagLinear.from_dense(weight, ref.bias.detach(), BlockDiagConfig(nblocks=7))
    assert rel_error(proj.to_dense_weight(), weight) == 0.0


def test_blockdiag_residual_recovers_block_diagonal_plus_low_rank():
    torch.manual_seed(4)
    ref = BlockDiagLinear(40, 32, nblocks=4, residual_rank=2).double()
    with torch.no_grad():
        ref.left.normal_()
    weight = ref.to_dense_weight().detach()
    one_shot = BlockDiagLinear.from_dense(weight, None, BlockDiagConfig(nblocks=4, residual_rank=2, refine_steps=0))
    refined = BlockDiagLinear.from_dense(weight, None, BlockDiagConfig(nblocks=4, residual_rank=2, refine_steps=80))
    assert rel_error(refined.to_dense_weight(), weight) < 1e-8
    assert rel_error(refined.to_dense_weight(), weight) < rel_error(one_shot.to_dense_weight(), weight)


@pytest.mark.parametrize("cls", [MonarchLinear, BlockDiagLinear])
@pytest.mark.parametrize("budget", [0, -0.5, 1.5, float("nan"), "half"])
def test_bad_budget_is_rejected(cls, budget):
    with pytest.raises(OptionError, match=r"^budget="):
        cls.Config(budget=budget)


def test_blockdiag_budget_too_small_names_the_fix():
    with pytest.raises(OptionError, match=r"budget=0.01: is below the cheapest block layout.*raise layer.budget"):
        BlockDiagLinear.from_dense(torch.randn(64, 64), None, BlockDiagConfig(budget=0.01))


def test_blockdiag_residual_share_below_one_component_is_an_error():
    with pytest.raises(OptionError, match=r"residual_fraction=0.01: of budget 0.5 keeps less than one rank-1"):
        BlockDiagLinear.from_dense(torch.randn(16, 16), None, BlockDiagConfig(residual_fraction=0.01))


@pytest.mark.parametrize("kwargs", [{"nblocks": 0}, {"nblocks": 9}, {"nblocks": 2.5}])
def test_bad_nblocks_is_rejected(kwargs):
    with pytest.raises(OptionError, match=r"nblocks=.*: must be an integer in \[1, 8\] for a 10x8 layer"):
        MonarchLinear(8, 10, **kwargs)
    with pytest.raises(OptionError, match=r"nblocks=.*: must be an integer in \[1, 8\] for a 10x8 layer"):
        BlockDiagLinear(8, 10, **kwargs)


@pytest.mark.parametrize("cls", [MonarchLinear, BlockDiagLinear])
def test_nblocks_beyond_the_layer_is_an_option_error(cls):
    with pytest.raises(OptionError, match=r"nblocks=9: must be an integer in \[1, 8\] for a 10x8 layer"):
        cls.from_dense(torch.randn(10, 8), None, cls.Config(nblocks=9))


def test_blockdiag_nblocks_never_exceeds_budget():
    for budget in (0.05, 0.2, 0.33, 0.7, 1.0):
        b = blockdiag_nblocks(budget, 96, 160)
        assert BlockDiagLinear(160, 96, nblocks=b).macs_per_token() <= budget * 96 * 160


@pytest.mark.parametrize("layer", [
    lambda: MonarchLinear.from_dense(torch.randn(30, 50), None, MonarchConfig(budget=0.3)),
    lambda: BlockDiagLinear.from_dense(torch.randn(30, 50), torch.randn(30), BlockDiagConfig(residual_fraction=0.3)),
])
def test_config_rebuilds_the_structure_for_a_saved_state_dict(layer):
    layer = layer()
    rebuilt = type(layer)(layer.in_features, layer.out_features, **layer.config())
    rebuilt.load_state_dict(layer.state_dict())
    x = torch.randn(4, layer.in_features)
    torch.testing.assert_close(rebuilt(x), layer(x))


def test_blockdiag_evaluates_bf16_activations_under_autocast():
    """bf16-mixed validation: bf16 inputs meet fp32 blocks without autograd (the in-place path cannot autocast)."""
    torch.manual_seed(0)
    layer = BlockDiagLinear.from_dense(torch.randn(12, 16), torch.randn(12), BlockDiagConfig(budget=0.5))
    x = torch.randn(5, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x.bfloat16())
    torch.testing.assert_close(out.float(), layer(x.bfloat16().float()).detach(), rtol=0.05, atol=0.05)
