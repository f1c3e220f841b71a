"""Initialise a compressed model from a dense pretrained checkpoint, decomposing each replaced layer."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from ..layers import StructuredConv2d, StructuredLinear
from ..surgery import replace_child

log = logging.getLogger(__name__)

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def load_state_dict(path: str | Path, hint: str = "") -> dict[str, Tensor]:
    """A flat state dict from a Lightning ``.ckpt``, a ``.safetensors``/``.pth``/``.bin`` file or an HF folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = [path / name for name in HF_WEIGHT_FILES if (path / name).exists()]
        if not found:
            raise FileNotFoundError(f"{path} holds none of {HF_WEIGHT_FILES}; point to a Hugging Face model folder")
        path = found[0]
    if not path.exists():
        raise FileNotFoundError(f"pretrained checkpoint {path} does not exist. {hint}".strip())
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=False)
    return state.get("state_dict", state)


class InitFromPretrained(pl.Callback):
    """At the start of fitting (not when resuming), load ``path`` into ``pl_module.model``.

    Dense weights of layers that surgery replaced are decomposed into the layer's type at the layer's
    budget and options (from ``pl_module.compression_report``); other tensors are copied. ``prefix`` is
    stripped from checkpoint keys (``model.`` for Lightning checkpoints of this project's tasks);
    ``add_prefix`` is prepended (e.g. ``bert.`` when a base-model folder seeds a task head model).
    """

    def __init__(self, path: str, prefix: str = "model.", add_prefix: str = "", strict: bool = False,
                 missing_hint: str = "Set callbacks.init_from_pretrained.path to a checkpoint file or HF folder."):
        self.path, self.prefix, self.add_prefix, self.strict = path, prefix, add_prefix, strict
        self.missing_hint = missing_hint
        self.errors: dict[str, float] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or trainer.ckpt_path:
            return
        state = {self.add_prefix + k.removeprefix(self.prefix): v for k, v in load_state_dict(self.path, self.missing_hint).items()}
        report = getattr(pl_module, "compression_report", None)
        rows = {row.name: row for row in (report.layers if report else [])}
        model: nn.Module = pl_module.model
        consumed = set()
        for name, row in rows.items():
            weight = state.get(f"{name}.weight")
            if weight is None:
                continue
            bias = state.get(f"{name}.bias")
            consumed.update({f"{name}.weight", f"{name}.bias"})
            self.errors[name] = self._decompose_into(model, name, row, weight, bias, report)
        rest = {k: v for k, v in state.items() if k not in consumed}
        missing, unexpected = model.load_state_dict(rest, strict=False)
        structured = {f"{n}." for n in rows}
        missing = [k for k in missing if not any(k.startswith(p) for p in structured)]
        if self.strict and (missing or unexpected or len(self.errors) < len(rows)):
            raise ValueError(f"{self.path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                             f"decomposed {len(self.errors)}/{len(rows)} replaced layers")
        log.info("initialised from %s: %d layers decomposed (mean rel. error %.4f), %d tensors copied, %d missing",
                 self.path, len(self.errors), sum(self.errors.values()) / max(1, len(self.errors)),
                 len(rest) - len(unexpected), len(missing))
        if trainer.logger is not None and self.errors:
            trainer.logger.log_metrics({f"init/rel_error/{k}": v for k, v in self.errors.items()}, step=0)

    @staticmethod
    @torch.no_grad()
    def _decompose_into(model: nn.Module, name: str, row, weight: Tensor, bias: Tensor | None, report=None) -> float:
        """Decompose ``weight`` as surgery did for layer ``name`` and put the result in its place: values are
        copied when the structure's tensor shapes match, else the layer is swapped (e.g. Gaudi dropping a
        different number of empty components). Runs in ``setup``, before the optimizer sees the parameters."""
        path = f"{name}.linear" if isinstance(model.get_submodule(name), StructuredConv2d) else name
        linear: StructuredLinear = model.get_submodule(path)
        ref = next(linear.parameters())
        weight = weight.to(ref.device, ref.dtype)
        weight = weight.t() if row.kind == "conv1d" else weight.reshape(weight.shape[0], -1)
        bias = None if bias is None else bias.to(ref.device, ref.dtype)
        fresh = type(linear).from_dense(weight, bias, row.budget, **row.options)
        current = linear.state_dict()
        if {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in current.items()}:
            linear.load_state_dict(fresh.state_dict())
        else:
            replace_child(model, path, fresh.train(linear.training))
            linear = fresh
            params_after = fresh.num_params()
            if report is not None:  # keep metrics.json's counts true to the swapped-in layer
                report.model_params_after += params_after - row.params_after
            row.params_after, row.flops_after = params_after, fresh.flops_per_token()
        return ((linear.to_dense_weight() - weight).norm() / weight.norm().clamp(min=1e-30)).item()
