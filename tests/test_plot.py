"""scripts/plot.py: the Pareto series it draws (from run folders or the tidy CSV) and the Gaudi-GBLR structure
maps of a checkpoint and a compressed folder, against intervals written out by hand."""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from scripts.make_table import load_rows, main as make_table
from scripts.plot import component_count, gaudi_layers, main, pareto_series

from .test_make_table import TRACEBACK, write_run


@pytest.fixture()
def sweep(tmp_path):
    """lowrank at 3 budgets (the middle one with 2 seeds and a failed third), monarch at 2, and dense."""
    root = tmp_path / "sweep"
    runs = [("lowrank", 0.5, 0, 0.80, 1000), ("lowrank", 0.5, 1, 0.90, 1000), ("lowrank", 0.1, 0, 0.60, 300),
            ("lowrank", 0.25, 0, 0.70, 500), ("monarch", 0.5, 0, 0.85, 1100), ("monarch", 0.25, 0, 0.75, 550),
            ("dense", 1.0, 0, 0.95, 2000)]
    for i, (layer, budget, seed, acc, macs) in enumerate(runs):
        write_run(root / str(i), f"fmnist/vit-{layer}", layer, budget, seed, acc=acc, macs=macs, params=macs // 2)
    write_run(root / "7", "fmnist/vit-lowrank", "lowrank", 0.5, 2, log=TRACEBACK, macs=1000)
    return root


def test_series_one_line_per_method_sorted_by_cost_with_seed_error_bars(sweep):
    series = {s.label: s for s in pareto_series(load_rows([sweep]), "test/acc", "macs_per_sample")}
    assert set(series) == {"vit_fmnist / lowrank / fmnist/vit-lowrank", "vit_fmnist / monarch / fmnist/vit-monarch",
                           "vit_fmnist / dense / fmnist/vit-dense"}
    lowrank = series["vit_fmnist / lowrank / fmnist/vit-lowrank"]
    assert lowrank.x == [300, 500, 1000] and lowrank.n == [1, 1, 2]  # the failed seed is not a point
    assert lowrank.y == pytest.approx([0.6, 0.7, 0.85])
    std = 0.1 / np.sqrt(2)
    np.testing.assert_allclose(lowrank.yerr, [(0, 0), (0, 0), (std, std)])
    assert series["vit_fmnist / monarch / fmnist/vit-monarch"].x == [550, 1100]
    assert [s.dense for s in series.values()] == [False, False, True]
    ranged = {s.label: s for s in pareto_series(load_rows([sweep]), "test/acc", "params_total", spread="range")}
    np.testing.assert_allclose(ranged["vit_fmnist / lowrank / fmnist/vit-lowrank"].yerr[-1], (0.05, 0.05))
    assert ranged["vit_fmnist / lowrank / fmnist/vit-lowrank"].x == [150, 250, 500]


def test_pareto_writes_png_and_svg_per_cost_from_folders_or_csv(sweep, tmp_path):
    assert main(["pareto", str(sweep), "--out", str(tmp_path / "plots")]) == 0
    written = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert written == [f"pareto_test_acc_vs_{x}.{ext}" for x in ("macs_per_sample", "params_total")
                       for ext in ("png", "svg")]  # no run has bytes_on_disk: that plot is skipped
    png = (tmp_path / "plots" / "pareto_test_acc_vs_macs_per_sample.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    svg = (tmp_path / "plots" / "pareto_test_acc_vs_macs_per_sample.svg").read_text()
    assert "<svg" in svg
    make_table([str(sweep), "--csv", str(tmp_path / "runs.csv")])
    assert main(["pareto", "--csv", str(tmp_path / "runs.csv"), "--metric", "test/loss", "--x", "params_total",
                 "--logx", "--out", str(tmp_path / "from_csv")]) == 0
    assert sorted(p.name for p in (tmp_path / "from_csv").iterdir()) == \
        ["pareto_test_loss_vs_params_total.png", "pareto_test_loss_vs_params_total.svg"]


def test_pareto_bad_metric_names_the_option(sweep, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["pareto", str(sweep), "--metric", "test/bleu", "--out", str(tmp_path)])
    assert "--metric test/bleu: no run has it" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["pareto", str(sweep), "--along", "lr", "--out", str(tmp_path)])
    assert "--along lr: not an id column" in capsys.readouterr().err


# ---------------------------------------------------------------- Gaudi-GBLR structure

def count_from_intervals(shape, components) -> np.ndarray:
    """Per entry, how many of ``components`` (rows, columns: index lists) cover it."""
    count = np.zeros(shape)
    for rows, cols in components:
        for r in rows:
            for c in cols:
                count[r, c] += 1
    return count


# fc1 (6 -> 12, 3 components): widths and locations in axis fractions, rows [input; output]; the second
# component wraps around both axes
FC1 = {"widths": [[3 / 6, 2 / 6, 6 / 6], [6 / 12, 3 / 12, 2 / 12]],
       "locations": [[0, 5 / 6, 0], [0, 10 / 12, 4 / 12]],
       "expected": [(range(0, 6), range(0, 3)), ([10, 11, 0], [5, 0]), ([4, 5], range(0, 6))]}
# patch-embedding conv (1 x 4 x 4 -> 6) with 2 segments of 8 columns, one component each: segment 1's
# columns are offset by 8
PROJ = {"widths": [[4 / 8, 2 / 8], [3 / 6, 2 / 6]], "locations": [[2 / 8, 7 / 8], [0, 5 / 6]],
        "expected": [(range(0, 3), range(2, 6)), ([5, 0], [15, 8])]}


def tiny_gaudi_vit():
    """A 1-block ViT whose MLP fc1 and patch-embedding conv are Gaudi-GBLR layers with FC1's and PROJ's
    intervals, and the Hydra model config that builds its dense skeleton."""
    from structured_compress.layers.conv import StructuredConv2d
    from structured_compress.layers.gaudi import GaudiGBLRLinear
    from structured_compress.models.timm_models import create_timm_model
    from structured_compress.modeltree import replace_child

    cfg = {"_target_": "structured_compress.models.timm_models.create_timm_model", "name": "vit_tiny_patch16_224",
           "img_size": 8, "patch_size": 4, "in_chans": 1, "num_classes": 2, "embed_dim": 6, "depth": 1, "num_heads": 1,
           "mlp_ratio": 2.0}
    torch.manual_seed(0)
    model = create_timm_model(**{k: v for k, v in cfg.items() if k != "_target_"})
    fc1 = GaudiGBLRLinear(6, 12, num_components=3, sigma=None)
    proj = GaudiGBLRLinear(16, 6, num_components=1, segments=2, sigma=None)
    for layer, spec in ((fc1, FC1), (proj, PROJ)):
        with torch.no_grad():
            layer.widths.copy_(torch.tensor(spec["widths"]))
            layer.locations.copy_(torch.tensor(spec["locations"]))
    replace_child(model, "blocks.0.mlp.fc1", fc1)
    replace_child(model, "patch_embed.proj", StructuredConv2d.from_conv(model.patch_embed.proj, proj))
    return model, cfg


def save_like_training(model, path) -> None:
    """A checkpoint as Lightning writes it in mode=train: the task's state dict and the structure record."""
    from structured_compress.pipeline import StructureRecord

    checkpoint = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "global_step": 1}
    StructureRecord(None, {}).on_save_checkpoint(None, types.SimpleNamespace(model=model), checkpoint)
    torch.save(checkpoint, path)


def test_component_count_matches_the_intervals():
    model, _ = tiny_gaudi_vit()
    fc1, proj = model.blocks[0].mlp.fc1, model.patch_embed.proj.linear
    np.testing.assert_array_equal(component_count(fc1), count_from_intervals((12, 6), FC1["expected"]))
    np.testing.assert_array_equal(component_count(proj), count_from_intervals((6, 16), PROJ["expected"]))
    assert fc1.training  # the layer's mode is restored


def test_gaudi_structure_from_checkpoint_and_compressed_folder(tmp_path):
    from structured_compress.io import save_compressed

    model, cfg = tiny_gaudi_vit()
    save_like_training(model, tmp_path / "last.ckpt")
    save_compressed(model, tmp_path / "compressed", source=cfg)
    expected = {"blocks.0.mlp.fc1": count_from_intervals((12, 6), FC1["expected"]),
                "patch_embed.proj": count_from_intervals((6, 16), PROJ["expected"])}
    from_checkpoint = gaudi_layers(tmp_path / "last.ckpt")
    assert list(from_checkpoint) == ["patch_embed.proj", "blocks.0.mlp.fc1"]
    for name, layer in from_checkpoint.items():
        np.testing.assert_array_equal(component_count(layer), expected[name])
    from_folder = gaudi_layers(tmp_path / "compressed")  # a conv's Gaudi layer is its .linear there
    assert sorted(from_folder) == ["blocks.0.mlp.fc1", "patch_embed.proj.linear"]
    np.testing.assert_array_equal(component_count(from_folder["blocks.0.mlp.fc1"]), expected["blocks.0.mlp.fc1"])
    for source in ("last.ckpt", "compressed"):
        out = tmp_path / "plots" / source
        assert main(["gaudi-structure", str(tmp_path / source), "--out", str(out)]) == 0
        assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
        assert "<svg" in out.with_suffix(".svg").read_text()


def test_gaudi_structure_without_gaudi_layers_says_so(tmp_path, capsys):
    from structured_compress.models.timm_models import create_timm_model

    model = create_timm_model("vit_tiny_patch16_224", img_size=8, patch_size=4, in_chans=1, num_classes=2,
                              embed_dim=6, depth=1, num_heads=1)
    save_like_training(model, tmp_path / "dense.ckpt")
    with pytest.raises(SystemExit):
        main(["gaudi-structure", str(tmp_path / "dense.ckpt"), "--out", str(tmp_path / "g")])
    assert "no Gaudi-GBLR layer to draw" in capsys.readouterr().err


def test_runs_differing_in_extra_overrides_share_a_line_unless_kept_apart(tmp_path):
    for i, (rank, macs, acc) in enumerate(((8, 800, 0.8), (4, 400, 0.7))):
        write_run(tmp_path / str(i), "e", "lowrank", 0.5, 0, acc=acc, macs=macs,
                  extra_overrides=(f"layer.options.rank={rank}",))
    (line,) = pareto_series(load_rows([tmp_path]), "test/acc", "macs_per_sample")
    assert (line.x, line.y) == ([400, 800], [0.7, 0.8])
    apart = pareto_series(load_rows([tmp_path]), "test/acc", "macs_per_sample", along=("budget",))
    assert sorted(s.x for s in apart) == [[400], [800]]
