"""The metrics each task logs, by name: the tasks log exactly these, and the compose-time checks read them
(``callbacks.model_checkpoint.monitor`` must name one). Torch-free, like :mod:`..glue_tasks`.

Keys are logged as ``<stage>/<name>``: ``train/loss`` while training, every name at ``val`` and ``test``.
"""
from __future__ import annotations

from typing import Any, Mapping

from ..glue_tasks import GLUE_TASKS

EVAL_STAGES = ("val", "test")
CLASSIFICATION_TOP_K = {"acc": 1, "acc_top5": 5}  # ClassificationTask's accuracies: name -> k of top-k
LANGUAGE_MODEL_METRICS = ("loss", "perplexity")
EMBEDDING_AGREEMENT_METRICS = ("cosine", "embedding_rel_error")
LIGHTNING_KEYS = ("epoch", "step")  # what ModelCheckpoint can monitor besides logged metrics


def sequence_classification_metrics(glue_task: str | None, metrics: list[str] | None) -> tuple[tuple, tuple]:
    """``(metric names, suffixes)`` of SequenceClassificationTask: ``metrics``, else GLUE's for ``glue_task``;
    one suffix per evaluation set (MNLI: ``""`` and ``"_mm"``), appended to every logged name."""
    if metrics is None and glue_task not in GLUE_TASKS:
        raise ValueError(f"give metrics or a GLUE task name (one of {sorted(GLUE_TASKS)}), not {glue_task!r}")
    names = tuple(metrics or GLUE_TASKS[glue_task].metrics)
    return names, GLUE_TASKS[glue_task].eval_suffixes if glue_task in GLUE_TASKS else ("",)


def logged_metrics(task: Mapping[str, Any]) -> set[str] | None:
    """Every key the task configured by ``task`` (a resolved ``task`` config) logs, or None for a task class
    not listed here."""
    kind = str(task.get("_target_", "")).rsplit(".", 1)[-1]
    if kind == "PooledEmbeddingAgreementTask":  # evaluation only: no loss
        return {f"{stage}/{name}" for stage in EVAL_STAGES for name in EMBEDDING_AGREEMENT_METRICS}
    if kind == "ClassificationTask":
        names, suffixes = ("loss", *CLASSIFICATION_TOP_K), ("",)
    elif kind == "LanguageModelTask":
        names, suffixes = LANGUAGE_MODEL_METRICS, ("",)
    elif kind == "SequenceClassificationTask":
        metrics, suffixes = sequence_classification_metrics(task.get("glue_task"), task.get("metrics"))
        names = ("loss", *metrics)
    else:
        return None
    return {"train/loss"} | {f"{stage}/{name}{suffix}" for stage in EVAL_STAGES for name in names
                             for suffix in suffixes}
