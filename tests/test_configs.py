"""Every experiment config composes, its objects instantiate and its layer selection is valid (no training)."""
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from src.layers import check_budget, get_layer_class
from src.surgery import check_options, select_layers
from src import pipeline
from src.utils.run_helpers import instantiate_list, make_trainer

from .conftest import compose_config, experiment_names


def check_layer_config(model, layer_cfg):
    """What compress_ would check, without the (possibly slow) decompositions."""
    cfg = OmegaConf.to_container(layer_cfg, resolve=True)
    types = cfg["name"] if isinstance(cfg["name"], dict) else {"*": cfg["name"]}
    budgets = cfg.get("budget", 1.0)
    for budget in (budgets.values() if isinstance(budgets, dict) else [budgets]):
        check_budget(budget)
    for type_name in types.values():
        options = cfg.get("options") or {}
        check_options(get_layer_class(type_name), options.get(type_name, {}) if isinstance(cfg["name"], dict) else options)
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
