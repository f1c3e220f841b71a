"""OmegaConf resolvers through which configs read facts kept in the code, instead of copying them per file.

``${glue_num_labels:cola}`` -> 2 (1 for STS-B regression) and ``${glue_metric:mrpc}`` -> ``f1`` (the metric
GLUE ranks a task by), so one GLUE experiment per method serves all nine tasks.
Torch-free (structured_compress.glue_tasks).
"""
from __future__ import annotations

from omegaconf import OmegaConf

from ..glue_tasks import glue_task


def glue_num_labels(task: str) -> int:
    """Output width of the GLUE head: 1 (regression) for STS-B, 3 for MNLI, 2 otherwise."""
    return glue_task(task).num_labels


def glue_metric(task: str) -> str:
    """The first (ranking) metric of a GLUE task, e.g. ``matthews`` for CoLA."""
    return glue_task(task).metrics[0]


def register_resolvers() -> None:
    """Make the resolvers above known to OmegaConf (idempotent)."""
    for name, fn in (("glue_num_labels", glue_num_labels), ("glue_metric", glue_metric)):
        OmegaConf.register_new_resolver(name, fn, replace=True)
