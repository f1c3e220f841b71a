"""``compress(cfg)``: post-training compression -- evaluate, calibrate, compress, evaluate, save.

No training: the pretrained model is tested, its layers replaced as the ``layer`` config says (with
calibration batches for data-aware types), tested again, and written with ``save_compressed``; metrics.json
holds both evaluations, the true bytes on disk and the ratio to the dense fp32/fp16 checkpoint.
"""
from __future__ import annotations

import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf

from . import pipeline
from .io import folder_sizes, save_compressed
from .runner import RunState, Steps, run
from .utils.report_logging import log_report


def dense_bytes(model: torch.nn.Module, bytes_per_value: int) -> int:
    """Size of the model's state dict with every floating number at ``bytes_per_value`` bytes (other tensors at
    their own size, tied tensors once): the dense checkpoint ``folder_sizes`` compares a save against."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.data_ptr(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * (bytes_per_value if tensor.is_floating_point() else tensor.element_size())
    return total


class CompressSteps(Steps):
    """mode=compress: the pretrained model, tested (``mode.eval_baseline``), compressed and saved; the
    skeleton's test then scores exactly the saved model."""

    def build(self, cfg: DictConfig, datamodule: pl.LightningDataModule) -> pipeline.Built:
        return pipeline.Built(pipeline.build_pretrained_task(cfg), report=None)

    def work(self, state: RunState) -> None:
        cfg, task, trainer, datamodule = state.cfg, state.built.task, state.trainer, state.datamodule
        baseline = trainer.test(task, datamodule=datamodule)[0] if cfg.mode.get("eval_baseline", True) else {}
        compress_start = time.perf_counter()
        state.built.report = pipeline.compress_task_model(task, cfg.layer, datamodule)
        state.facts.update(baseline_metrics={k: float(v) for k, v in baseline.items()},
                           compress_time_s=round(time.perf_counter() - compress_start, 2),
                           compressed_path=str(self.saved_dir(cfg).resolve()))
        # save first: storing the untouched tensors at the storage dtype rounds them in the model too, so the
        # test scores exactly the saved model (rank 0 saves; other DDP ranks keep the unrounded tensors)
        if trainer.is_global_zero:
            storage = OmegaConf.to_container(cfg.mode.storage, resolve=True) if cfg.mode.get("storage") else None
            head_gram = pipeline.output_embedding_calibration(task, storage,
                                                              int(cfg.layer.get("calibration_batches") or 8),
                                                              datamodule)
            save_compressed(task.model, self.saved_dir(cfg), state.built.report,
                            source=pipeline.dense_model_factory_config(cfg), storage=storage, calibration=head_gram)

    def tested(self, state: RunState) -> dict:
        return {"tested_checkpoint": None, "tested_because": "the compressed model as saved"}

    def finish(self, state: RunState, metrics: dict) -> None:
        sizes = folder_sizes(self.saved_dir(state.cfg))
        metrics.update(sizes)
        log_report(state.trainer.loggers, state.built.report, sizes)

    @staticmethod
    def saved_dir(cfg: DictConfig) -> Path:
        return Path(cfg.paths.output_dir) / "compressed"


def compress(cfg: DictConfig) -> tuple[dict, dict]:
    """Post-training compression run; returns ``(metrics, objects)``."""
    return run(cfg, CompressSteps())
