"""InitFromPretrained: dense checkpoint -> replaced layers decomposed at their budget, the rest copied."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from src.callbacks.init_from_pretrained import InitFromPretrained
from src.layers.lowrank import LowRankLinear
from src.surgery import compress_


def make_model():
    return nn.Sequential(nn.Linear(12, 20), nn.LayerNorm(20), nn.Linear(20, 6))


def test_checkpoint_is_decomposed_into_replaced_layers(tmp_path):
    torch.manual_seed(0)
    pretrained = make_model()
    with torch.no_grad():
        pretrained[1].weight.uniform_(0.5, 1.5)
    ckpt = tmp_path / "dense.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in pretrained.state_dict().items()}}, ckpt)

    task = SimpleNamespace(model=make_model())
    task.compression_report = compress_(task.model, "lowrank", 0.5, include=["0", "2"])
    callback = InitFromPretrained(str(ckpt), strict=True)
    callback.setup(SimpleNamespace(ckpt_path=None, logger=None), task, "fit")

    expected = LowRankLinear.from_dense(pretrained[0].weight, pretrained[0].bias, 0.5)
    torch.testing.assert_close(task.model[0].to_dense_weight(), expected.to_dense_weight())
    torch.testing.assert_close(task.model[0].bias, pretrained[0].bias)
    torch.testing.assert_close(task.model[1].weight, pretrained[1].weight)  # not replaced: copied
    assert set(callback.errors) == {"0", "2"} and all(0 < e < 1 for e in callback.errors.values())


def test_layer_whose_structure_changes_is_swapped(tmp_path):
    """Types whose tensor shapes depend on the weights (Gaudi drops empty components) cannot be loaded into
    the layer surgery built from random weights; the decomposed layer replaces it instead."""
    torch.manual_seed(0)
    pretrained = nn.Sequential(nn.Sequential(nn.Linear(12, 20)))
    ckpt = tmp_path / "dense.pt"
    torch.save(pretrained.state_dict(), ckpt)
    task = SimpleNamespace(model=nn.Sequential(nn.Sequential(nn.Linear(12, 20))))
    task.compression_report = compress_(task.model, "lowrank", 0.5)
    task.model[0][0] = LowRankLinear(12, 20, rank=1)  # a different structure than from_dense gives (rank 3)
    row = task.compression_report.layers[0]
    row.params_after, row.flops_after = task.model[0][0].num_params(), task.model[0][0].flops_per_token()
    task.compression_report.model_params_after = task.model[0][0].num_params()
    InitFromPretrained(str(ckpt), prefix="", strict=True).setup(SimpleNamespace(ckpt_path=None, logger=None), task, "fit")
    expected = LowRankLinear.from_dense(pretrained[0][0].weight, pretrained[0][0].bias, 0.5)
    assert task.model[0][0].rank == expected.rank == 3
    torch.testing.assert_close(task.model[0][0].to_dense_weight(), expected.to_dense_weight())
    assert (row.params_after, row.flops_after) == (expected.num_params(), expected.flops_per_token())
    assert task.compression_report.model_params_after == expected.num_params()


def test_resume_skips_initialisation(tmp_path):
    task = SimpleNamespace(model=make_model())
    task.compression_report = compress_(task.model, "lowrank", 0.5)
    before = task.model[0].left.clone()
    InitFromPretrained(str(tmp_path / "missing.ckpt")).setup(SimpleNamespace(ckpt_path="last.ckpt", logger=None),
                                                            task, "fit")
    torch.testing.assert_close(task.model[0].left, before)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    task = SimpleNamespace(model=make_model(), compression_report=None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        InitFromPretrained(str(tmp_path / "nope.ckpt")).setup(SimpleNamespace(ckpt_path=None, logger=None), task, "fit")
