"""The tasks' training knobs (tasks/schedule.py): a task built from Python refuses a bad value with the same
OptionError the compose-time check turns into ``task.<key>=...``, and the schedule reaches the optimizer."""
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from structured_compress.errors import ConfigError
from structured_compress.layers.gaudi import GaudiGBLRLinear
from structured_compress.run_checks import check_task_optim
from structured_compress.tasks.classification import ClassificationTask
from structured_compress.tasks.language_model import LanguageModelTask
from structured_compress.tasks.optim import build_optimizer
from structured_compress.tasks.schedule import Schedule
from structured_compress.typed_config import OptionError

ADAMW = partial(torch.optim.AdamW, lr=1e-3)


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))


@pytest.mark.parametrize("key,arguments", [
    ("warmup_fraction", {"warmup_fraction": 2.0}),
    ("label_smoothing", {"label_smoothing": -0.1}),
    ("optimizer.lr", {"optimizer": partial(torch.optim.AdamW, lr=-1.0)}),
    ("optimizer.betas", {"optimizer": partial(torch.optim.AdamW, betas=(0.9, 1.5))}),
    ("structure_optim.lr", {"structure_optim": {"lr": "abc"}}),
])
def test_a_task_built_from_python_fails_like_the_config_check(key, arguments):
    task_arguments = {"optimizer": ADAMW, **arguments}
    with pytest.raises(OptionError) as from_python:
        ClassificationTask(tiny_model(), num_classes=3, **task_arguments)
    assert from_python.value.option == key
    with pytest.raises(ConfigError) as composed:
        check_task_optim(task_arguments)
    error, message = from_python.value, str(composed.value)
    assert message.startswith(f"task.{key}=") and message.endswith(f": {error.problem}; {error.fix}")


def test_the_language_model_task_checks_its_schedule_too():
    with pytest.raises(OptionError, match=r"^min_lr_ratio=1\.5: must be <= 1"):
        LanguageModelTask(tiny_model(), optimizer=ADAMW, min_lr_ratio=1.5)


def test_the_schedule_reaches_the_optimizer_and_caps_the_structure_lr():
    schedule = Schedule(weight_decay=0.1, warmup_fraction=0.5, structure_optim={"lr": 1.0, "betas": [0.0, 0.999]},
                        structure_lr_scale=0.5)
    trainer = SimpleNamespace(estimated_stepping_batches=10, max_epochs=2)  # 5 batches per epoch
    model = nn.Sequential(nn.Flatten(), GaudiGBLRLinear(4, 3, num_components=2, sigma=None))
    built = build_optimizer(model, ADAMW, schedule, trainer)
    groups = {group["name"]: group for group in built["optimizer"].param_groups}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["structure"]["weight_decay"] == 0.0
    assert groups["structure"]["initial_lr"] == pytest.approx(0.5 / 5) and groups["decay"]["initial_lr"] == 1e-3
    assert groups["structure"]["betas"] == [0.0, 0.999]
    assert built["lr_scheduler"]["scheduler"].lr_lambdas[0](0) == pytest.approx(1 / 5)  # warmup over 5 steps
