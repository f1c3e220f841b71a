"""Block-sequential post-training compression: one block of the model in memory and calibrated at a time.

For models built from a stack of repeated blocks (HF decoder / encoder layers, timm ViT ``blocks``),
:func:`compress_sequential` runs the calibration batches up to block 0 once, then for each block in turn:
loads its dense weights (when they are read lazily, see ``io.dense_weights``), moves it to the compute device,
collects the calibration data of its selected linears only, compresses them, writes the block's shard (when a
``CompressedWriter`` is given), runs the compressed block to make the next block's inputs, and frees the rest.
Later blocks therefore calibrate on what the compressed blocks before them produce, as GPTQ does, and memory
holds one block's calibration data instead of the whole model's.

A block whose shard an earlier (killed) run already wrote is rebuilt from that shard instead of compressed
again; each block draws its random numbers from its own seed, so a resumed run writes the same bytes.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import logging
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .io.dense_weights import DenseWeights
from .io.save import CompressedWriter, Part, exact_keys
from .io.shards import decoded_tensors
from .io.structure import install_structured_layers, layer_entry, structured_layers
from .layers.config import LayerConfig
from .layers.fastpath import clear_caches
from .modeltree import FilterFn, dense_view, select_layers
from .planner import AutoConfig
from .surgery import CompressionReport, LayerReport, compress_, config_table, evenly_spaced_rows
from .progress import progress_bar

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by the last block's recorder: nothing after the blocks (final norm, LM head) has to run."""


class _Recorder(nn.Module):
    """Stands in for a block while the model runs once per batch: records the arguments the model passes to
    the block (its masks and position embeddings may differ per block) and hands the hidden states on."""

    def __init__(self, calls: list, last: bool):
        super().__init__()
        self.calls, self.last = calls, last

    def forward(self, *args, **kwargs):
        self.calls.append((args, _without_cache(kwargs)))
        if self.last:
            raise _Stop
        return args[0] if args else kwargs["hidden_states"]


def _without_cache(kwargs: dict) -> dict:
    """Block arguments with the KV cache off: calibration runs each block many times on the same batch."""
    kwargs = dict(kwargs)
    if "past_key_values" in kwargs:
        kwargs["past_key_values"] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return kwargs


def _with_hidden(call: tuple, hidden: Tensor) -> tuple:
    args, kwargs = call
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _hidden_of(output: Any) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _move(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_move(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value


def find_block_stack(model: nn.Module, names: Iterable[str]) -> str | None:
    """The qualified name of the ``nn.ModuleList`` / ``nn.Sequential`` of same-type blocks that holds every one
    of ``names`` (None when there is none: no block structure to go by)."""
    names = list(names)
    best, best_count = None, 0
    for stack_name, module in model.named_modules():
        if not stack_name or not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 1:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        count = sum(name.startswith(stack_name + ".") for name in names)
        if count > best_count:
            best, best_count = stack_name, count
    return best if names and best_count == len(names) else None


def record_block_calls(model: nn.Module, stack: nn.Module, batches: Iterable,
                       forward: Callable[[nn.Module, Any], Any], device: torch.device) -> list[list[tuple]]:
    """Per block, per batch, the ``(args, kwargs)`` the model passes to that block (block 0's hold the real
    hidden states; the others' are replaced as the blocks run). No block runs here."""
    calls: list[list] = [[] for _ in range(len(stack))]
    blocks = list(stack)
    for index in range(len(stack)):
        stack[index] = _Recorder(calls[index], last=index == len(stack) - 1)
    try:
        for batch in batches:
            try:
                forward(model, _move(batch, device))
            except _Stop:
                pass
    finally:
        for index, block in enumerate(blocks):
            stack[index] = block
    return calls


class BlockCalibration:
    """Collects the calibration data of one block's selected layers while the block runs: per layer
    ``{"gram": sum x x^T (float64), "inputs": up to max_inputs rows}``, one copy per distinct input (layers that
    read the same tensor, such as q/k/v or gate/up, share it). ``gram=False`` skips the Gram matrices when no
    setting needs them (at LLaMA-7B width the MLP's down projection alone has a 0.97 GB one)."""

    def __init__(self, block: nn.Module, prefix: str, names: Sequence[str], max_inputs: int, gram: bool = True):
        self.with_gram = gram
        self.grams: dict[str, Tensor] = {}
        self.samples: dict[str, list[Tensor]] = {}
        self.owner: dict[str, str] = {}  # layer -> the first layer that read its input
        self._readers: dict[int, tuple[Tensor, str]] = {}  # per call: input id -> (input, kept alive; reader)
        self.max_inputs = max_inputs
        self.hooks = [block.get_submodule(name[len(prefix) + 1:]).register_forward_pre_hook(self._hook(name))
                      for name in names]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            owner = self._readers.setdefault(id(x), (x, name))[1]
            self.owner.setdefault(name, owner)
            if owner != name:
                return
            if dense_view(module)[0] == "conv2d":
                x = torch.nn.functional.unfold(x, module.kernel_size, module.dilation, module.padding,
                                               module.stride).transpose(1, 2)
            rows = x.reshape(-1, x.shape[-1])
            if self.with_gram:
                wide = rows.double()
                self.grams[name] = self.grams.get(name, 0) + wide.T @ wide
            self.samples.setdefault(name, []).append(evenly_spaced_rows(rows.detach(), self.max_inputs).clone())

        return hook

    def run(self, block: nn.Module, calls: Sequence[tuple]) -> None:
        """Run ``block`` on every recorded call (its outputs are dropped), collecting."""
        for args, kwargs in calls:
            self._readers = {}
            block(*args, **kwargs)
        self._readers = {}

    def close(self) -> dict[str, dict[str, Tensor]]:
        """The collected data per layer; the hooks are removed."""
        for hook in self.hooks:
            hook.remove()
        data = {name: {"gram": self.grams.get(name), "inputs": evenly_spaced_rows(torch.cat(rows), self.max_inputs)}
                for name, rows in self.samples.items()}
        self.grams, self.samples = {}, {}
        return {name: data[owner] for name, owner in self.owner.items()}


def _glibc():
    """The C library when it is glibc (None elsewhere, e.g. musl or macOS: nothing to tune there)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)


def map_large_allocations(threshold: int = 1 << 20) -> None:
    """Serve every allocation above ``threshold`` bytes with its own mapping, returned to the OS when freed.
    glibc raises its mmap threshold each time a mapped block is freed (up to 32 MB), after which a block's
    tensors of up to 32 MB come from the heap, and its fragments made each block's peak higher than the
    last one's (about 120 MB per block at half LLaMA-7B width); fixing the threshold keeps the peak flat.
    The setting is process-wide and stays for the rest of the run."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, threshold)


def release_freed_memory() -> None:
    """Collect the block's reference cycles and hand the C heap's free pages back to the OS (glibc's
    ``malloc_trim``), so what one block used does not stay in the process's footprint for the next one."""
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def per_block_configs(planned: Mapping[str, LayerConfig], sizes: Mapping[str, int],
                      blocks: int) -> dict[str, LayerConfig]:
    """``planned`` with each ``layer=auto`` target restated for one block: ``target_bytes`` as the ratio it
    implies over all of that config's layers (``sizes``: numbers per layer; each block then meets that ratio),
    ``max_error`` split evenly over the blocks."""
    restated: dict[int, LayerConfig] = {}
    for config in {id(c): c for c in planned.values() if isinstance(c, AutoConfig)}.values():
        if config.target_bytes is not None:
            fp16_bytes = sum(2 * sizes[name] for name, c in planned.items() if c is config)
            restated[id(config)] = dataclasses.replace(config, target_bytes=None,
                                                       target_ratio=fp16_bytes / config.target_bytes)
        elif config.max_error is not None:
            restated[id(config)] = dataclasses.replace(config, max_error=config.max_error / blocks)
    return {name: restated.get(id(config), config) for name, config in planned.items()}


def _move_outside(model: nn.Module, stack_name: str, device: torch.device, buffers: bool = True) -> None:
    """Move every parameter (and buffer, with ``buffers``) that is not in the block stack to ``device``; tied
    parameters stay one parameter. To the meta device (``buffers=False``: rotary tables stay) it frees them:
    once block 0's inputs are recorded nothing outside the blocks runs again, and an LLM's embeddings and LM
    head, its largest tensors, are read again only to be written."""
    moved: dict[int, nn.Parameter] = {}
    for name, module in model.named_modules():
        if name == stack_name or name.startswith(stack_name + "."):
            continue
        for key, param in module._parameters.items():
            if param is not None and param.device != device:
                if id(param) not in moved:
                    moved[id(param)] = nn.Parameter(param.to(device), param.requires_grad)
                module._parameters[key] = moved[id(param)]
        for key, buffer in module._buffers.items():
            if buffer is not None and buffers:
                module._buffers[key] = buffer.to(device)


@contextlib.contextmanager
def _layer_caches_dropped(block: nn.Module):
    """Within the block, each layer's fast-path copies (dequantized weights, ``layers.fastpath``) are dropped
    as soon as the layer has run: kept, a compressed block's copies add up to its dense size in float32
    while the next block's inputs are made (0.8 GB at LLaMA-7B width)."""
    def drop(module, args, output):
        clear_caches(module)

    hooks = [module.register_forward_hook(drop) for module in block.modules()]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _restore_block(model: nn.Module, prefix: str, part: Part, file, device: torch.device) -> None:
    """Rebuild a block an earlier run compressed, from its shard (no decomposition runs)."""
    state = decoded_tensors(part.tensors, part.aliases, [file], device)
    install_structured_layers(model, part.layers, state, f"the shard {file.name}")
    model.get_submodule(prefix).load_state_dict({key[len(prefix) + 1:]: value for key, value in state.items()},
                                                strict=True, assign=True)


@torch.no_grad()
def compress_sequential(model: nn.Module, layer: str | LayerConfig | Mapping[str, str | LayerConfig],
                        budget: float | Mapping[str, float] | None = None,
                        include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None,
                        filter_fn: FilterFn | None = None, options: Mapping | None = None, *,
                        batches: Iterable | None = None, forward: Callable[[nn.Module, Any], Any] | None = None,
                        weights: DenseWeights | None = None, device: str | torch.device | None = None,
                        writer: CompressedWriter | None = None, release: bool = False, seed: int = 0,
                        max_inputs: int = 4096) -> CompressionReport:
    """:func:`~structured_compress.surgery.compress_`, one block at a time (see the module doc).

    layer, budget, include, exclude, filter_fn, options: as for ``compress_``; every selected layer must lie in
        one block stack (:func:`find_block_stack`).
    batches, forward: calibration batches and ``forward(model, batch)`` (default ``model(batch)``), needed when
        a selected setting is data-aware.
    weights: a ``DenseWeights`` to read each block's dense tensors from when the block is reached (the model
        then is a skeleton on the meta device; what lies outside the blocks is read to record block 0's inputs,
        and is in memory at the end unless ``release``).
    device: where blocks are calibrated and compressed (default: where the model's parameters are); each block
        goes back where it came from afterwards (the CPU when read from ``weights``), or to the meta device with
        ``release`` (its memory freed: the blocks are then only in the writer's shards). With ``release`` and
        ``weights``, the parameters outside the blocks are on the meta device too, from when block 0's inputs
        are recorded: finish the writer with ``weights=``, it reads them from the checkpoint.
    writer: writes each block's part as soon as the block is done; parts it already finds on disk are loaded
        instead of compressed again (the caller finishes it with the tensors outside the blocks).
    """
    forward = forward or (lambda m, batch: m(batch))
    config_for = config_table(layer, budget, options)
    # sizes only: holding the selected modules would keep every replaced block's dense weights alive
    sizes = {name: dense_view(module)[1].numel() for name, module in
             select_layers(model, include, exclude, filter_fn).items()}
    planned = {name: config for name in sizes if (config := config_for(name)) is not None}
    if not planned:
        raise ValueError("no layer was replaced: the include/exclude patterns and layer dict select nothing")
    stack_name = find_block_stack(model, planned)
    if stack_name is None:
        raise ValueError("the selected layers do not all lie in one stack of blocks: use compress_ (all at once)")
    stack = model.get_submodule(stack_name)
    planned = per_block_configs(planned, sizes, len(stack))
    if weights is not None and hasattr(model, "tie_weights"):
        model.tie_weights()  # a skeleton built from a config may hold a tied head as a second parameter
    params_before = sum(p.numel() for p in model.parameters())
    home = torch.device("cpu") if weights is not None else next(iter(model.parameters())).device
    device = torch.device(device) if device is not None else home
    map_large_allocations()
    release_freed_memory()  # what building the model and the data left freed (e.g. tokenizing) goes back first
    needs_data = any(config.calibration_needed() for config in planned.values())
    outside_freed = release and weights is not None
    calls = None
    if needs_data:
        if batches is None:
            raise ValueError("the selected settings are data-aware: pass calibration batches")
        if weights is not None:
            weights.load(model, skip=(stack_name + ".",))
        _move_outside(model, stack_name, device)
        calls = record_block_calls(model, stack, batches, forward, device)
        if outside_freed:
            _move_outside(model, stack_name, torch.device("meta"), buffers=False)
            release_freed_memory()
    report = CompressionReport(model_params_before=params_before)
    with progress_bar(len(stack), f"compress {stack_name}", "block") as bar:
        for index in range(len(stack)):
            started = time.perf_counter()
            prefix = f"{stack_name}.{index}"
            names = [name for name in planned if name.startswith(prefix + ".")]
            part = writer.done_part(index) if writer is not None else None
            if part is not None:
                _restore_block(model, prefix, part, writer.directory / writer.written[-1][1]["file"], device)
                rows = [LayerReport(**row) for row in part.report]
                log.info("block %s: restored from %s", prefix, writer.written[-1][1]["file"])
            else:
                if weights is not None:
                    weights.load(stack[index], prefix + ".")
                stack[index].to(device)
                calibration = None
                if needs_data and names:
                    gram = any("gram" in planned[name].calibration_needed() for name in names)
                    collector = BlockCalibration(stack[index], prefix, names, max_inputs, gram)
                    collector.run(stack[index], calls[index])
                    calibration = collector.close()
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    torch.manual_seed(seed + index)
                    rows = compress_(model, {name: planned[name] for name in names}, include=names,
                                     calibration=calibration).layers if names else []
                del calibration
                if writer is not None:
                    block = stack[index]
                    writer.write_part({f"{prefix}.{k}": v for k, v in block.state_dict().items()},
                                      [layer_entry(f"{prefix}.{n}", m) for n, m in structured_layers(block).items()],
                                      [dataclasses.asdict(row) for row in rows],
                                      {f"{prefix}.{key}" for key in exact_keys(block)})
            report.layers.extend(rows)
            if needs_data and index + 1 < len(stack):
                with _layer_caches_dropped(stack[index]):
                    for j, call in enumerate(calls[index]):
                        output = _hidden_of(stack[index](*call[0], **call[1]))
                        calls[index + 1][j] = _with_hidden(calls[index + 1][j], output)
                calls[index] = None
            stack[index].to("meta" if release else home)
            release_freed_memory()
            errors = [row.output_error for row in report.layers if row.output_error is not None]
            bar.set_postfix(layers=len(report.layers), s_per_block=round(time.perf_counter() - started, 1),
                            **({"mean_output_error": f"{sum(errors) / len(errors):.4f}"} if errors else {}))
            bar.update(1)
    if weights is not None and not release and not needs_data:
        weights.load(model, skip=(stack_name + ".",))
    elif needs_data and device != home and not outside_freed:
        _move_outside(model, stack_name, home)
    report.model_params_after = params_before - report.params_before + report.params_after
    return report
