"""OmegaConf resolvers through which configs read facts kept in the code, instead of copying them per file.

``${glue_num_labels:cola}`` -> 2 (1 for STS-B regression) and ``${glue_metric:mrpc}`` -> ``f1`` (the metric
GLUE ranks a task by), so one GLUE experiment per method serves all nine tasks.
"""
from __future__ import annotations

from omegaconf import OmegaConf


def _glue_task_names() -> list[str]:
    from ..tasks.glue import GLUE_METRICS

    return sorted(GLUE_METRICS)


def _check_glue_task(task: str) -> None:
    if task not in _glue_task_names():
        raise ValueError(f"unknown GLUE task datamodule.task_name={task!r}; use one of {_glue_task_names()}")


def glue_num_labels(task: str) -> int:
    """Output width of the GLUE head: 1 (regression) for STS-B, 3 for MNLI, 2 otherwise."""
    from ..datamodules.glue import GLUE_TASKS

    _check_glue_task(task)
    return GLUE_TASKS[task].num_labels


def glue_metric(task: str) -> str:
    """The first (ranking) metric of a GLUE task, e.g. ``matthews`` for CoLA."""
    from ..tasks.glue import GLUE_METRICS

    _check_glue_task(task)
    return GLUE_METRICS[task][0]


def register_resolvers() -> None:
    """Make the resolvers above known to OmegaConf (idempotent)."""
    for name, fn in (("glue_num_labels", glue_num_labels), ("glue_metric", glue_metric)):
        OmegaConf.register_new_resolver(name, fn, replace=True)
