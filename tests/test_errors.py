"""Bad input gets one clear, actionable error (what was wrong, what to do)."""
import pytest
import torch
from torch import nn

from structured_compress.datamodules.common import DatasetNotFoundError
from structured_compress.datamodules.fashion_mnist import FashionMNISTDataModule
from structured_compress.surgery import compress_


def small_model():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_include_pattern_that_matches_nothing_names_real_layers():
    with pytest.raises(ValueError, match=r"include pattern 'blocks\.\*' matched no replaceable layer.*such as: 0, 2"):
        compress_(small_model(), "lowrank", 0.5, include=["blocks.*"])


def test_missing_dataset_names_the_three_ways_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr("structured_compress.datamodules.fashion_mnist.SYSTEM_DIR", tmp_path / "nowhere")
    dm = FashionMNISTDataModule(data_dir=str(tmp_path), allow_download=False)
    with pytest.raises(DatasetNotFoundError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(tmp_path / "fashion_mnist") in message
    assert "internet" in message


def test_surgery_report_counts_and_dense_is_identity():
    torch.manual_seed(0)
    model = small_model()
    x = torch.randn(3, 8)
    expected = model(x)
    report = compress_(model, "dense", 1.0)
    torch.testing.assert_close(model(x), expected)
    assert report.params_before == report.params_after == 8 * 16 + 16 + 16 * 4 + 4
    lowrank_model = small_model()
    report = compress_(lowrank_model, {"0": "lowrank", "2": "dense"}, {"0": 0.5, "*": 1.0})
    assert [r.layer_type for r in report.layers] == ["lowrank", "dense"]
    assert report.layers[0].params_after == 2 * (8 + 16) + 16  # rank floor(0.5*128/24) = 2
