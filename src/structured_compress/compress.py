"""``compress(cfg)``: post-training compression -- evaluate, calibrate, compress, evaluate, save.

No training: the pretrained model is tested, its layers replaced as the ``layer`` config says (with
calibration batches for data-aware types) on the run's accelerator, tested again, and written; metrics.json
holds both evaluations, the true bytes on disk and the ratio to the dense fp32/fp16 checkpoint. Models built
from a stack of blocks are compressed block by block, each block's shard written as it is done (a killed run
re-run with ``resume=auto`` continues at the first unfinished block); a causal LM without a baseline test is
read from its checkpoint block by block, never whole.
"""
from __future__ import annotations

import resource
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf

from . import pipeline
from .io import CompressedWriter, folder_sizes, load_compressed, save_compressed
from .io.save import dense_dtype
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

    writer: CompressedWriter | None = None

    def build(self, cfg: DictConfig, datamodule: pl.LightningDataModule) -> pipeline.Built:
        lazy = pipeline.build_lazy_task(cfg)
        if lazy is not None:
            return pipeline.Built(lazy[0], report=None, weights=lazy[1])
        return pipeline.Built(pipeline.build_pretrained_task(cfg), report=None)

    def work(self, state: RunState) -> None:
        cfg, task, trainer, datamodule = state.cfg, state.built.task, state.trainer, state.datamodule
        baseline = trainer.test(task, datamodule=datamodule)[0] if cfg.mode.get("eval_baseline", True) else {}
        storage = OmegaConf.to_container(cfg.mode.storage, resolve=True) if cfg.mode.get("storage") else None
        compress_start = time.perf_counter()
        # on the run's accelerator: Lightning's test teardown left the model on the CPU
        state.built.report = pipeline.compress_task_model(
            task, cfg.layer, datamodule, device=trainer.strategy.root_device, weights=state.built.weights,
            writer=self._writer_for(cfg, task.model, storage) if trainer.is_global_zero else None,
            release=not pipeline.head_gram_needed(storage))  # GPTQ-rounding the head runs the compressed model
        state.facts.update(baseline_metrics={k: float(v) for k, v in baseline.items()},
                           compress_time_s=round(time.perf_counter() - compress_start, 2),
                           compressed_path=str(self.saved_dir(cfg).resolve()))
        # save first: storing the untouched tensors at the storage dtype rounds them in the model too, so the
        # test scores exactly the saved model (rank 0 saves; other DDP ranks keep the unrounded tensors)
        if trainer.is_global_zero:
            head_gram = pipeline.output_embedding_calibration(task, storage,
                                                              int(cfg.layer.get("calibration_batches") or 8),
                                                              datamodule)
            source = pipeline.dense_model_factory_config(cfg)
            if self.writer is not None:  # the blocks' shards are written: add the rest and seal
                self.writer.finish(task.model, source, state.built.report, head_gram, weights=state.built.weights)
            else:
                save_compressed(task.model, self.saved_dir(cfg), state.built.report, source=source, storage=storage,
                                calibration=head_gram)
        # the process's peak so far: loading, calibrating, compressing and saving, before the test's logits
        state.facts["peak_rss_before_test_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if cfg.get("test") and any(p.is_meta for p in task.model.parameters()):
            # the blocks left memory as their shards were written: the test reads the saved folder back
            load_compressed(self.saved_dir(cfg), model_skeleton=task.model)

    def _writer_for(self, cfg: DictConfig, model: torch.nn.Module, storage: dict | None):
        """What makes the block-by-block writer: each block's shard lands in the output folder as soon as the
        block is done, and a re-run of the same command (``resume=auto``) continues after the last one."""
        fingerprint = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("layer", "model")}
        fingerprint.update(storage=storage, seed=cfg.get("seed"))

        def make(parts: int) -> CompressedWriter:
            self.writer = CompressedWriter(self.saved_dir(cfg), parts, storage, dense_dtype(model), fingerprint,
                                           model=model)
            return self.writer

        return make

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
