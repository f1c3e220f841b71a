"""Typed configs of the tasks' training knobs: the numbers of ``task.optimizer`` and ``task.structure_optim``, and
the decay, warmup + cosine schedule and label smoothing (:class:`Schedule`), each checked when built.

The tasks build their :class:`Schedule` from their own arguments and ``run_checks.check_task_optim`` builds it from
the composed ``task`` group, so both refuse a bad value with the same :class:`OptionError`. Torch-free.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping, Sequence

from ..typed_config import OptionError, TypedConfig, option


@dataclass
class OptimizerNumbers(TypedConfig):
    """The numeric keyword arguments of a torch optimizer, or of one of its parameter groups, checked here; a key
    left out keeps the optimizer's own default (the defaults below are AdamW's, SGD's for ``momentum``)."""

    lr: float = option(1e-3, "learning rate: the peak the warmup + cosine schedule scales", gt=0)
    betas: list[float] = option([0.9, 0.999], "Adam's decay rates of its first and second moment estimates",
                                ge=0, lt=1)
    eps: float = option(1e-8, "added to Adam's denominator for numerical stability", gt=0)
    momentum: float = option(0.0, "SGD's momentum factor", ge=0, lt=1)
    weight_decay: float = option(0.01, "the group's decay; task.optimizer's is replaced in every group a task builds, "
                                 "so set task.weight_decay instead", ge=0)

    def validate(self) -> None:
        if len(self.betas) != 2:
            raise OptionError("betas", self.betas, "must be two numbers (first and second moment decay)",
                              "e.g. [0.9,0.999]")

    @classmethod
    def from_keywords(cls, keywords: Mapping[str, Any], owner: str | None = None) -> "OptimizerNumbers":
        """Checks the numbers among ``keywords``; given an ``owner``, any other key is an error too."""
        names = [field.name for field in fields(cls)]
        if owner:
            cls.check_keys(keywords, names, owner)
        return cls(**{key: _plain(value) for key, value in keywords.items() if key in names})


@dataclass
class Schedule(TypedConfig):
    """A task's training knobs besides the optimizer's own numbers (tasks/optim.py applies them). The defaults are
    neutral: each task's signature and ``configs/task/*.yaml`` carry its recipe."""

    weight_decay: float = option(0.0, "decay of the weight matrices; biases, norms and structural parameters get "
                                 "none", ge=0)
    warmup_fraction: float = option(0.0, "share of the training steps over which the lr rises linearly from 0",
                                    ge=0, le=1)
    min_lr_ratio: float = option(0.0, "the cosine after the warmup ends at this fraction of the peak lr", ge=0, le=1)
    label_smoothing: float = option(0.0, "label smoothing of the training cross-entropy (ClassificationTask)",
                                    ge=0, lt=1)
    structure_optim: dict | None = option(None, "own lr, betas, ... of the structural parameters, such as Gaudi "
                                          "widths and locations, without decay; null = task.optimizer's")
    structure_lr_scale: float | None = option(None, "caps structure_optim.lr at scale / train batches per epoch, "
                                              "as the GLUE recipe's min(2e-3, 0.5 / #batches); null = no cap", gt=0)

    def validate(self) -> None:
        if self.structure_optim is not None:
            _under("structure_optim.", lambda: OptimizerNumbers.from_keywords(self.structure_optim, "structure_optim"))

    @classmethod
    def from_task(cls, task: Mapping[str, Any]) -> "Schedule":
        """The schedule of a task's arguments (its hyperparameters, or the composed ``task`` group), after checking
        ``optimizer``'s numbers; an :class:`OptionError` names the key under ``task``, e.g. ``optimizer.lr``."""
        _under("optimizer.", lambda: OptimizerNumbers.from_keywords(optimizer_keywords(task.get("optimizer"))))
        knobs = {field.name: task[field.name] for field in fields(cls) if field.name in task}
        if isinstance(knobs.get("structure_optim"), Mapping):  # Hydra passes a DictConfig
            knobs["structure_optim"] = dict(knobs["structure_optim"])
        return cls(**knobs)


def optimizer_keywords(optimizer: Any) -> Mapping[str, Any]:
    """The keyword arguments of ``task.optimizer``: a ``_partial_`` config's keys, or a ``functools.partial``'s
    keywords; none for an optimizer class or any other callable."""
    if isinstance(optimizer, Mapping):
        return {key: value for key, value in optimizer.items() if not str(key).startswith("_")}
    return optimizer.keywords if isinstance(optimizer, functools.partial) else {}


def _plain(value: Any) -> Any:
    """A list for any sequence but a string (Hydra passes lists as ListConfig)."""
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value


def _under(prefix: str, check: Callable[[], Any]) -> None:
    """``check()``, its :class:`OptionError` naming the option under ``prefix`` (``optimizer.lr``)."""
    try:
        check()
    except OptionError as err:
        raise OptionError(prefix + err.option, err.value, err.problem, err.fix) from None
