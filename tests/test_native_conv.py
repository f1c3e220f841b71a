"""Native conv forms (``StructuredLinear.conv_forward``) against the unfold reference, per layer type."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from structured_compress.layers import get_layer_class
from structured_compress.layers.blockdiag import BlockDiagConfig
from structured_compress.layers.conv import StructuredConv2d, kernel_as_matrix
from structured_compress.layers.fastpath import reference_paths
from structured_compress.layers.gaudi.config import GaudiConfig
from structured_compress.layers.hyper import HyperConfig
from structured_compress.layers.lowrank import LowRankConfig
from structured_compress.layers.monarch import MonarchConfig
from structured_compress.layers.svdq import SVDQuantConfig
from structured_compress.layers.tsvd import TernarySVDConfig

# (in channels, out channels, kernel, stride, padding, dilation): odd counts, counts 3 blocks do not divide
GEOMETRIES = [(7, 9, 1, 1, 0, 1), (6, 10, 3, 2, 1, 1), (5, 8, 3, 1, 2, 2), (8, 12, 1, 2, 0, 1), (9, 6, 3, 1, 1, 1),
              (12, 12, 3, 1, 1, 1)]
CONFIGS = {
    "lowrank": LowRankConfig(budget=0.5),
    "blockdiag": BlockDiagConfig(nblocks=3),
    "blockdiag_residual": BlockDiagConfig(nblocks=2, residual_rank=2),
    "monarch": MonarchConfig(nblocks=3),
    "monarch2": MonarchConfig(nblocks=2),
    "svdq": SVDQuantConfig(rank=3),
    "tsvd": TernarySVDConfig(tolerance=0.3, steps=4),
    "gaudi": GaudiConfig(budget=0.5, sweeps=1),
    "gaudi_kernel": GaudiConfig(budget=0.5, sweeps=1, segments="kernel"),
    "hyper": HyperConfig(),
}


def structured_conv(name: str, geometry: tuple, seed: int = 0) -> StructuredConv2d:
    """A float64 structured conv made by ``from_dense`` from a random dense conv of ``geometry``."""
    c_in, c_out, k, stride, pad, dil = geometry
    torch.manual_seed(seed)
    dense = nn.Conv2d(c_in, c_out, k, stride, pad, dil).double()
    config = CONFIGS[name]
    cls = get_layer_class(config.layer_type)
    weight = kernel_as_matrix(dense.weight.detach(), cls.conv_column_order)
    linear = cls.from_dense(weight, dense.bias.detach(), config, kernel_positions=k * k).double()
    return StructuredConv2d.from_conv(dense, linear).eval()


def inputs(geometry: tuple, channels_last: bool = False) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn(2, geometry[0], 11, 10, dtype=torch.float64)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def assert_native_equals_unfold(conv, geometry):
    """The conv's form equals the unfold reference in float64, on NCHW and channels-last inputs (the latter
    kept channels-last)."""
    for channels_last in (False, True):
        x = inputs(geometry, channels_last)
        with torch.no_grad():
            native = conv(x)
            with reference_paths():
                reference = conv(x)
        assert native.shape == reference.shape
        torch.testing.assert_close(native, reference, rtol=0, atol=1e-10)
        if channels_last:
            assert native.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_native_form_equals_unfold(name, geometry):
    conv = structured_conv(name, geometry)
    assert conv.running_form() == "native"
    assert_native_equals_unfold(conv, geometry)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("name", ["gaudi", "gaudi_kernel"])
def test_gaudi_sliced_interval_form_equals_unfold(name, geometry, monkeypatch):
    from structured_compress.layers.gaudi import conv as gaudi_conv
    monkeypatch.setattr(gaudi_conv, "SLICED_ADVANTAGE", 0.0)  # always the sliced form where a plan exists
    conv = structured_conv(name, geometry)
    assert gaudi_conv.prefer_sliced(conv.linear, conv.linear.compact_plan(), conv.geometry)
    assert_native_equals_unfold(conv, geometry)


@pytest.mark.parametrize("name", ["lowrank", "monarch", "blockdiag", "tsvd", "gaudi"])
def test_dense_form_caches_the_kernel_at_inference(name):
    geometry = GEOMETRIES[1]
    conv = structured_conv(name, geometry)
    x = inputs(geometry)
    with torch.no_grad(), reference_paths():
        reference = conv(x)
    conv.form = "dense"
    assert conv.running_form() == "dense" and conv.running_form(training=True) != "dense"
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), reference, rtol=0, atol=1e-10)
    assert "dense_kernel" in conv.__dict__["_fast_cache"]
    with pytest.raises(ValueError, match="form must be one of"):
        conv.form = "fast"


def _factor_grads(conv: StructuredConv2d, x: torch.Tensor) -> dict[str, torch.Tensor]:
    conv.zero_grad(set_to_none=True)
    conv(x).square().sum().backward()
    return {name: p.grad.clone() for name, p in conv.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("geometry", [GEOMETRIES[0], GEOMETRIES[2], GEOMETRIES[4]])
@pytest.mark.parametrize("name", ["lowrank", "blockdiag", "blockdiag_residual", "monarch", "gaudi", "gaudi_kernel"])
def test_factor_gradients_equal_under_both_paths(name, geometry):
    conv = structured_conv(name, geometry).train()
    conv.form = "dense"  # training ignores the dense kernel: gradients reach the factors
    for structural in conv.linear.structural_parameters().values():
        structural.requires_grad_(False)  # Gaudi: a frozen structure keeps exact intervals in training
    x = inputs(geometry)
    native = _factor_grads(conv, x)
    with reference_paths():
        reference = _factor_grads(conv, x)
    assert native.keys() == reference.keys() and len(native) >= 2
    for key in native:
        torch.testing.assert_close(native[key], reference[key], rtol=0, atol=1e-10)
    assert "_fast_cache" not in conv.__dict__ or "dense_kernel" not in conv.__dict__["_fast_cache"]


@pytest.mark.parametrize("name", ["gaudi", "gaudi_kernel"])
def test_gaudi_sliced_form_gradients_equal_unfold(name, monkeypatch):
    from structured_compress.layers.gaudi import conv as gaudi_conv
    monkeypatch.setattr(gaudi_conv, "SLICED_ADVANTAGE", 0.0)
    geometry = GEOMETRIES[4]
    conv = structured_conv(name, geometry).train()
    for structural in conv.linear.structural_parameters().values():
        structural.requires_grad_(False)
    x = inputs(geometry)
    native = _factor_grads(conv, x)
    with reference_paths():
        reference = _factor_grads(conv, x)
    for key in reference:
        torch.testing.assert_close(native[key], reference[key], rtol=0, atol=1e-10)


def test_compressed_resnet18_reloads_and_runs_native_bit_identically(tmp_path):
    timm = pytest.importorskip("timm")
    from structured_compress import load_compressed, save_compressed
    from structured_compress.surgery import compress_

    def resnet() -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model("resnet18", pretrained=False, num_classes=10).eval()

    model = resnet()
    types = {"layer1.*": "monarch", "layer2.*": "blockdiag", "layer3.*": "lowrank", "layer4.*": "svdq"}
    report = compress_(model, types, budget=0.5, include="layer*")
    assert {row.conv_form for row in report.layers} == {"native"}
    model.get_submodule("layer4.1.conv2").form = "dense"
    path = save_compressed(model, tmp_path / "resnet18", report=report, storage={"dtype": "fp32"})
    loaded = load_compressed(path, resnet())
    convs = {name: m for name, m in loaded.named_modules() if isinstance(m, StructuredConv2d)}
    assert len(convs) == len(report.layers)
    assert convs["layer4.1.conv2"].form == "dense"
    assert all(m.running_form() == "native" for name, m in convs.items() if name != "layer4.1.conv2")
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = model(x)
        assert torch.equal(loaded(x), expected)
        with reference_paths():
            torch.testing.assert_close(loaded(x), expected, rtol=1e-4, atol=1e-4)
