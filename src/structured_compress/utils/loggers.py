"""Logger configs that continue one history when a run resumes in its folder.

Lightning logs a training batch at the number of optimizer steps taken before it, so a run resumed from a
checkpoint of global step ``G`` logs again from step ``G`` on; every logger keeps exactly the steps below ``G`` of the
earlier process. TensorBoard purges the others (``purge_step``), the CSV logger drops their rows (``csv_logger.py``),
and W&B, which cannot drop what it recorded, continues the same run (id recorded in the run folder,
``wandb_run_id``) and is not sent again what it already recorded (:class:`ResumableWandbLogger`).
"""
from __future__ import annotations

import json
import secrets
import struct
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

from hydra.utils import get_class
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from .files import atomic_write_text

WANDB_ID_FILE = "wandb_run_id"
WANDB_STEP_KEY = "trainer/global_step"  # the step WandbLogger.log_metrics records with each row
_LOG_BLOCK, _LOG_HEADER = 32768, struct.Struct("<IHB")  # W&B's transaction log: LevelDB log blocks and records
_FULL, _FIRST, _LAST = 1, 2, 4


def wandb_run_id(output_dir: str | Path, resumed: bool) -> str:
    """The W&B run id of this run folder: the recorded one when the run resumes, else a new one (recorded)."""
    recorded = Path(output_dir) / WANDB_ID_FILE
    if resumed and recorded.is_file():
        return recorded.read_text().strip()
    run_id = secrets.token_hex(4)
    if rank_zero_only.rank == 0:
        atomic_write_text(recorded, run_id)
    return run_id


def wandb_records(path: str | Path) -> Iterator[bytes]:
    """The serialized records of a W&B ``.wandb`` transaction log, up to a torn or corrupt tail (a killed writer).
    wandb ships no reader of its own (``wandb sync`` reads them in its Go core)."""
    with open(path, "rb") as file:
        if file.read(7)[:4] != b":W&B":
            return
        block, pending = file.read(_LOG_BLOCK - 7), b""
        while block:
            pos = 0
            while len(block) - pos >= _LOG_HEADER.size:
                crc, length, kind = _LOG_HEADER.unpack_from(block, pos)
                chunk = block[pos + _LOG_HEADER.size:pos + _LOG_HEADER.size + length]
                if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
                    return
                pos += _LOG_HEADER.size + length
                pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
                if kind in (_FULL, _LAST):
                    yield pending
            block = file.read(_LOG_BLOCK)


def wandb_history(path: str | Path) -> Iterator[dict[str, object]]:
    """The history rows (``run.log`` calls) a ``.wandb`` file recorded, as ``{key: value}``."""
    from wandb.proto import wandb_internal_pb2

    for data in wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            yield {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}


def recorded_wandb_steps(sync_dir: str | Path, run_id: str) -> dict[str, int]:
    """The highest trainer step W&B recorded for each metric in the earlier sessions of run ``run_id`` (their
    ``.wandb`` files beside this session's folder ``sync_dir``)."""
    steps: dict[str, int] = {}
    session = Path(sync_dir)
    for path in session.parent.glob(f"*-{run_id}/run-{run_id}.wandb"):
        if path.parent == session:
            continue
        for row in wandb_history(path):
            if row.get(WANDB_STEP_KEY) is not None:
                step = int(row[WANDB_STEP_KEY])
                steps.update({key: max(step, steps.get(key, step)) for key in row})
    return steps


class ResumableWandbLogger(WandbLogger):
    """``WandbLogger`` that logs each step once across resumes: W&B cannot drop the steps a resumed run replays
    (rewind is online-only), so a metric is not sent at a step W&B already recorded it at in an earlier session of
    the run (read back from its files, so steps a killed process sent but W&B never wrote are sent again). Resumes
    are bit-exact, so the skipped values equal the recorded ones."""

    _recorded: dict[str, int] | None = None

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if step is not None:
            if self._recorded is None:
                self._recorded = recorded_wandb_steps(self.experiment.sync_dir, self.experiment.id)
            join = f"{self._prefix}{self.LOGGER_JOIN_CHAR}" if self._prefix else ""
            metrics = {key: value for key, value in metrics.items() if step > self._recorded.get(join + key, -1)}
            if not metrics:
                return
        super().log_metrics(metrics, step)


def resumable_loggers(group: DictConfig | None, output_dir: str | Path,
                      resumed_step: int | None) -> DictConfig | None:
    """``cfg.logger`` (resolved) with what each logger needs to keep one history across resumes from
    ``resumed_step`` (the global step of the checkpoint; None for a fresh run)."""
    if not group:
        return group
    loggers = OmegaConf.create(OmegaConf.to_container(group, resolve=True))
    for logger in loggers.values():
        if not isinstance(logger, DictConfig) or "_target_" not in logger:
            continue
        kind = get_class(logger._target_)
        if issubclass(kind, TensorBoardLogger) and resumed_step is not None:
            logger.purge_step = resumed_step  # drops steps >= resumed_step: the resumed run logs them again
        if issubclass(kind, WandbLogger) and not (logger.get("id") or logger.get("version")):
            logger.id = wandb_run_id(output_dir, resumed=resumed_step is not None)
    return loggers
