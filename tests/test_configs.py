"""Every experiment config composes and its objects instantiate (no training)."""
import pytest
from hydra.utils import instantiate

from src.utils.run_helpers import apply_layer_config, instantiate_list

from .conftest import compose_config, experiment_names


@pytest.mark.parametrize("experiment", experiment_names())
def test_experiment_composes_and_instantiates(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}"], tmp_path)
    assert cfg.layer.name and cfg.datamodule._target_ and cfg.model._target_
    if not cfg.get("offline_available", True):  # weights or data that only a hub/user can provide
        return
    datamodule = instantiate(cfg.datamodule)
    task = instantiate(cfg.task, model=instantiate(cfg.model))
    if int(cfg.layer.get("calibration_batches", 0) or 0) == 0:
        report = apply_layer_config(task, cfg.layer)
        assert report.layers
    callbacks = instantiate_list(cfg.callbacks)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=instantiate_list(cfg.logger) or False)
    assert trainer is not None and datamodule is not None


@pytest.mark.parametrize("group,choice", [("trainer", "cpu"), ("trainer", "debug"), ("logger", "tensorboard"),
                                          ("logger", "wandb"), ("debug", "overfit"), ("mode", "eval"),
                                          ("layer", "dense"), ("model", "mixer_fmnist")])
def test_config_groups_compose(group, choice, tmp_path):
    cfg = compose_config([f"{group}={choice}"], tmp_path)
    assert cfg is not None
