"""``AutoModelFor*.from_pretrained(folder)`` on a compressed folder: a transformers quantization config and
quantizer for the format (``quant_method: structured_compress``, which ``save_compressed`` writes into the
folder's ``config.json``; ``import structured_compress`` registers both, see ``hf_registration``).

The weight files keep their names, so without the registration ``from_pretrained`` finds no weights and fails.
With it, the quantizer

* reads and checks the folder as ``load_compressed`` does (hashes, seal, tensor table against the file headers
  and layer configs) and that ``config.json`` is the config sealed in the manifest, then points transformers at
  the weights (the one file or the shard index) in the saved dtype;
* on the meta skeleton transformers built, installs the recorded structured layers (``install_structured_layers``);
* lets transformers read each stored tensor and decode it with the format's own codec (``storage.decode``, on
  the CPU, into the dtype the model held it in), aliases (tied tensors) included;
* after loading, makes sure every stored tensor arrived, lets each structured layer run its load hooks (e.g.
  hyper decodes its weight), and guards ``save_pretrained`` as ``load_compressed`` does.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import UserInputError
from .compressed_format import checked_folder, guard_save_pretrained
from .manifest import FORMAT_VERSION, MANIFEST_FILE, READABLE_VERSIONS, differences
from .shards import INDEX_FILE
from .source import HF_QUANT_METHOD
from .storage import decode, parse_dtype, stored_layout
from .structure import install_structured_layers, structured_layers

# config fields transformers itself sets while loading; every other difference from the sealed config is refused
_LOADING_FIELDS = ("_name_or_path", "dtype", "quantization_config", "transformers_weights", "transformers_version")


class StructuredCompressConfig(QuantizationConfigMixin):
    """``config.json``'s ``quantization_config`` of a compressed folder: the format version it was saved with."""

    def __init__(self, version: int = FORMAT_VERSION, quant_method: str = HF_QUANT_METHOD, **unknown):
        if quant_method != HF_QUANT_METHOD or unknown:
            raise ValueError(f"not a {HF_QUANT_METHOD} quantization_config: quant_method={quant_method!r}, "
                             f"unknown fields {sorted(unknown)}")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"quantization_config.version={version!r}: this structured-compress reads format "
                             f"versions {READABLE_VERSIONS} (a newer save needs a newer structured-compress)")
        self.quant_method, self.version = HF_QUANT_METHOD, version


class _Decode(ConversionOps):
    """One stored tensor's file tensors (``key``, ``key#scales``, ...) -> the tensor the model held, plus its
    aliases; ``storage.decode`` does the work, as for ``load_compressed``."""

    def __init__(self, quantizer: "StructuredCompressQuantizer", suffixes: dict[str, str]):
        self.quantizer, self.suffixes = quantizer, suffixes  # source pattern -> file-key suffix

    def __deepcopy__(self, memo):  # transformers copies the converter per tensor; this op holds no per-tensor state
        return self

    def convert(self, input_dict, source_patterns=None, target_patterns=None, full_layer_name=None, **kwargs):
        key, quantizer = full_layer_name, self.quantizer
        stored = {key + self.suffixes[pattern]: tensors[0] for pattern, tensors in input_dict.items()}
        value = decode(key, quantizer.manifest["tensors"][key], stored)
        quantizer.decoded.add(key)
        return {key: value, **{alias: value for alias in quantizer.aliases_of.get(key, [])}}


class StructuredCompressQuantizer(HfQuantizer):
    """Loads a folder written by ``save_compressed``, on one device, in its saved dtype (``dtype="auto"`` or that
    dtype; then ``model.to(...)`` converts)."""

    def __init__(self, quantization_config: StructuredCompressConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        # nothing is compressed on the fly: the folder holds the compressed tensors also when its config.json
        # predates quantization_config and the caller passes StructuredCompressConfig() (transformers then says
        # pre_quantized=False)
        self.pre_quantized = True
        self.directory: Path | None = None
        self.manifest: dict[str, Any] = {}
        self.files: list[Path] = []
        self.aliases_of: dict[str, list[str]] = {}
        self.decoded: set[str] = set()
        self.dtype: torch.dtype | None = None

    def validate_environment(self, device_map=None, **kwargs) -> None:
        devices = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
        if device_map is not None and (len(devices) != 1 or devices & {"disk", "meta"} or isinstance(device_map, str)):
            raise UserInputError(f"device_map={device_map!r}: a compressed folder loads onto one device; pass "
                                 f"device_map='cpu' or e.g. 'cuda:0' (or load it and dispatch the model "
                                 f"yourself)")

    def update_attn_implementation(self, config):
        """Check the folder and point transformers at its weights, in the saved dtype: this is the one
        quantizer hook that sees the model config before transformers looks for weight files."""
        config = super().update_attn_implementation(config)
        self.directory = Path(config.name_or_path)
        if not (self.directory / MANIFEST_FILE).is_file():
            raise UserInputError(f"from_pretrained reads a compressed folder from its local directory: "
                                 f"{self.directory} has no {MANIFEST_FILE} (no subfolder=, no hub repo; copy the "
                                 f"folder locally)")
        self.manifest, self.files = checked_folder(self.directory)
        source = self.manifest["source"] or {}
        if source.get("kind") != "hf":
            raise UserInputError(f"{self.directory} holds no transformers model; use load_compressed(path)")
        # both read by this transformers version, as load_compressed reads the sealed one
        ours, sealed = (json.loads(c.to_json_string(use_diff=False)) for c in
                        (config, type(config).from_dict(source["config"])))
        found = differences(*({k: v for k, v in c.items() if k not in _LOADING_FIELDS} for c in (ours, sealed)))
        if found:
            raise UserInputError(f"the config differs from the one sealed in {self.directory} (config.json edited, "
                                 f"or from_pretrained given config overrides; set such options on model.config "
                                 f"after loading):\n  " + "\n  ".join(found))
        config.transformers_weights = INDEX_FILE if len(self.files) > 1 else self.files[0].name
        config.dtype = self.dtype = parse_dtype(self.manifest["storage"]["model_dtype"],
                                                "manifest field storage.model_dtype")
        for alias, target in self.manifest["aliases"].items():
            self.aliases_of.setdefault(target, []).append(alias)
        return config

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if dtype != self.dtype:
            raise UserInputError(f"dtype={dtype}: {self.directory} holds a {self.dtype} model; load it with "
                                 f"dtype='auto' (the default) and convert it with model.to({dtype})")
        return dtype

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        """Refuse another class or file set than the folder's; install the structured layers."""
        cls = self.manifest["source"]["class"]
        if type(model).__name__ != cls:
            raise UserInputError(f"{self.directory} holds a {cls}, not a {type(model).__name__}: load it with "
                                 f"{cls}.from_pretrained or its AutoModelFor... class")
        if sorted(Path(f).resolve() for f in checkpoint_files or []) != sorted(f.resolve() for f in self.files):
            raise UserInputError(f"transformers resolved the weights {checkpoint_files}, the manifest of "
                                 f"{self.directory} records {[str(f) for f in self.files]}")
        described = {key: torch.empty(entry["shape"], dtype=parse_dtype(entry["dtype"], key), device="meta")
                     for key, entry in self.manifest["tensors"].items()}
        described.update({alias: described[target] for alias, target in self.manifest["aliases"].items()})
        install_structured_layers(model, self.manifest["layers"], described, "the manifest")
        # every parameter comes from the folder: transformers' init (which e.g. reaches into GPT-2's c_proj.weight)
        # runs only where it computes non-persistent buffers (rotary frequencies, position ids), as constructors do
        inside = tuple(name + "." for name in structured_layers(model))
        for name, module in model.named_modules():
            if not module._non_persistent_buffers_set or (name + ".").startswith(inside):
                module._is_hf_initialized = True
        return model

    def get_new_dtype(self, converter, param, dtype):
        return None  # stored tensors reach the decoder as written; it returns each in the dtype the model held

    def update_weight_conversions(self, weight_conversions, model):
        """Only the decoder: the folder stores the model's own state-dict names, which no checkpoint renaming
        of the model's class may touch."""
        suffixes = {file_key[len(key):] for key, entry in self.manifest["tensors"].items()
                    for file_key in stored_layout(key, entry)} - {""}
        patterns = {re.escape(suffix): suffix for suffix in sorted(suffixes)} | {"$": ""}
        return [WeightConverter(list(patterns), "", [_Decode(self, patterns)], force_cpu=True)]

    def _process_model_after_weight_loading(self, model, **kwargs):
        missing = sorted(set(model.state_dict()) - self.decoded - set(self.manifest["aliases"]))
        if missing:
            raise UserInputError(f"from_pretrained did not load {len(missing)} tensor(s) of {self.directory}: "
                                 f"{missing[:5]}; use load_compressed(path)")
        with torch.no_grad():
            for layer in structured_layers(model).values():  # what derives state on load (hyper's weight) runs
                layer.load_state_dict(layer.state_dict(keep_vars=True), strict=True, assign=True)
        del model.config.transformers_weights  # where transformers read the weights; not part of the model
        guard_save_pretrained(model)
        return model

    def is_serializable(self) -> bool:
        return False  # transformers' writer cannot write the format; save_pretrained is guarded to write it

    @property
    def is_trainable(self) -> bool:
        return True  # structured layers are ordinary modules: they fine-tune like the rest
