"""The nine GLUE tasks as data: text columns, label count (1 = STS-B regression), evaluation splits and GLUE's
metrics (the one a task is ranked by first; algorithms.md §8). Torch-free, so that configs can read it through
the ``glue_num_labels`` / ``glue_metric`` resolvers while a config is checked, before torch is imported."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GlueTask:
    text_keys: tuple[str, str | None]
    num_labels: int  # 1 = regression (STS-B)
    metrics: tuple[str, ...]
    eval_splits: tuple[str, ...] = ("validation",)
    eval_suffixes: tuple[str, ...] = ("",)  # appended to metric names, one per evaluation split


GLUE_TASKS = {
    "cola": GlueTask(("sentence", None), 2, ("matthews",)),
    "sst2": GlueTask(("sentence", None), 2, ("accuracy",)),
    "mrpc": GlueTask(("sentence1", "sentence2"), 2, ("f1", "accuracy")),
    "qqp": GlueTask(("question1", "question2"), 2, ("f1", "accuracy")),
    "stsb": GlueTask(("sentence1", "sentence2"), 1, ("pearson", "spearman")),
    "mnli": GlueTask(("premise", "hypothesis"), 3, ("accuracy",), ("validation_matched", "validation_mismatched"),
                     ("", "_mm")),
    "qnli": GlueTask(("question", "sentence"), 2, ("accuracy",)),
    "rte": GlueTask(("sentence1", "sentence2"), 2, ("accuracy",)),
    "wnli": GlueTask(("sentence1", "sentence2"), 2, ("accuracy",)),
}


def glue_task(name: str) -> GlueTask:
    """The task called ``name``, or a ValueError that lists the nine names."""
    if name not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task datamodule.task_name={name!r}; use one of {sorted(GLUE_TASKS)}")
    return GLUE_TASKS[name]
