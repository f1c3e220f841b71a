"""How a saved model records the dense model it came from, so ``load_compressed(path)`` can rebuild it.

A *source spec* is one of
  ``{"kind": "hf", "class": "BertForSequenceClassification", "config": {...}}``  a transformers model
      (the class and its full config; taken from the model itself, no weights are needed to rebuild it);
  ``{"kind": "timm", "name": "vit_small_patch16_224", "kwargs": {...}}``         ``timm.create_model``;
  ``{"kind": "hydra", "config": {"_target_": "structured_compress.models....", ...}}``          a project model config.
``describe_source`` turns what the user has (nothing, a Hydra model config, a spec) into a spec.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .manifest import FORMAT_VERSION

SOURCE_KINDS = ("hf", "timm", "hydra")
HYDRA_TARGET_PREFIX = "structured_compress.models."  # a saved folder may only name the project's own model builders
TIMM_BUILDER = "structured_compress.models.timm_models.create_timm_model"
HF_CONFIG_FILE = "config.json"
HF_QUANT_METHOD = "structured_compress"  # config.json's quantization_config.quant_method (see hf_quantizer)
_HF_LOADING_FIELDS = ("quantization_config", "transformers_weights")  # a from_pretrained load's, not the model's


def is_hf_model(model: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` (checked without importing transformers)."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def timm_source(name: str, **kwargs) -> dict[str, Any]:
    """The spec of ``timm.create_model(name, **kwargs)`` (e.g. ``img_size=32, num_classes=10``)."""
    return {"kind": "timm", "name": name, "kwargs": kwargs}


def _hf_config(model: nn.Module):
    """A copy of the model's config that names its class, as ``save_pretrained`` writes it."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    for key in _HF_LOADING_FIELDS:
        if key in config.__dict__:
            delattr(config, key)
    return config


def _plain(value: Any) -> Any:
    """A Hydra/OmegaConf config as plain, resolved JSON-able containers."""
    if type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return copy.deepcopy(value)


def describe_source(model: nn.Module, source: Any = None) -> dict[str, Any] | None:
    """The source spec to record: ``source`` (a spec or a Hydra model config with ``_target_``) normalised,
    or for a transformers model its class and config; ``None`` when nothing says how to rebuild it."""
    if source is None:
        return hf_source(model) if is_hf_model(model) else None
    source = _plain(source)
    if not isinstance(source, dict):
        raise ValueError(f"source must be a dict (a source spec or a Hydra model config), got {source!r}")
    target = source.get("_target_")
    if target is None and "kind" in source:  # a spec (a Hydra config may have its own "kind" argument)
        check_source(source)
        return source
    if target is None:
        raise ValueError(f"source needs 'kind' (one of {SOURCE_KINDS}) or a Hydra '_target_'; "
                         f"got keys {sorted(source)}")
    if is_hf_model(model):
        return hf_source(model)  # the model's own config is exact (labels, head size), the Hydra one a recipe
    kwargs = {k: v for k, v in source.items() if k not in ("_target_", "name", "pretrained", "pretrained_path")}
    if target == TIMM_BUILDER and not _targets(kwargs):  # nested targets (e.g. a conv stem) need Hydra
        spec = timm_source(source.get("name"), **kwargs)
        check_source(spec)
        return spec
    spec = {"kind": "hydra", "config": source}
    check_source(spec)
    return spec


def hf_source(model: nn.Module) -> dict[str, Any]:
    config = json.loads(_hf_config(model).to_json_string(use_diff=False))
    return {"kind": "hf", "class": type(model).__name__, "config": config}


def _targets(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [t for k, v in value.items() for t in ([v] if k == "_target_" else _targets(v))]
    if isinstance(value, list):
        return [t for v in value for t in _targets(v)]
    return []


def check_source(spec: Mapping[str, Any]) -> None:
    """Fail with the field named unless ``spec`` is a well-formed source spec."""
    kind = spec.get("kind")
    if kind not in SOURCE_KINDS:
        raise ValueError(f"source.kind must be one of {SOURCE_KINDS}, got {kind!r}")
    required = {"hf": {"class": str, "config": dict}, "timm": {"name": str, "kwargs": dict},
                "hydra": {"config": dict}}[kind]
    for key, kind_type in required.items():
        if not isinstance(spec.get(key), kind_type):
            raise ValueError(f"source.{key} must be a {kind_type.__name__} for a {kind!r} source, "
                             f"got {spec.get(key)!r}")
    if kind == "hydra":
        foreign = [t for t in _targets(spec["config"]) if not str(t).startswith(HYDRA_TARGET_PREFIX)]
        if foreign or "_target_" not in spec["config"]:
            raise ValueError(f"source.config must build the model with a {HYDRA_TARGET_PREFIX}* _target_ "
                             f"(a saved folder never names other code to run); got {foreign or 'no _target_'}; "
                             f"pass a model skeleton to load_compressed instead")


def build_from_source(spec: Mapping[str, Any], dtype: torch.dtype) -> nn.Module:
    """The dense model a spec describes, its floating tensors in ``dtype``, in eval mode (weights are about to
    be replaced, so transformers skips its weight init). A transformers model is built in ``dtype`` as
    transformers builds it (``from_config(dtype=...)``, ``from_pretrained``): buffers it keeps in float32, e.g.
    rotary frequencies, stay float32."""
    check_source(spec)
    if spec["kind"] == "hf":
        import transformers
        from transformers.initialization import no_init_weights

        cls = getattr(transformers, spec["class"], None)
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise ValueError(f"source.class {spec['class']!r} is not a transformers model class")
        with no_init_weights():
            return cls._from_config(cls.config_class.from_dict(spec["config"]), dtype=dtype).eval()
    if spec["kind"] == "timm":
        import timm

        model = timm.create_model(spec["name"], pretrained=False, **spec["kwargs"])
    else:
        from hydra.utils import instantiate

        model = instantiate(spec["config"])
    return model.to(dtype).eval()


def write_hf_config(model: nn.Module, directory: Path) -> bool:
    """For a transformers model write ``config.json`` so ``AutoConfig`` (and tokenizers saved beside it)
    recognise the folder, with a ``quantization_config`` that ``from_pretrained`` loads the folder by; returns
    whether it did."""
    from ..utils.files import atomic_write_text  # deferred: that module imports Lightning

    if not is_hf_model(model):
        return False
    config = _hf_config(model)
    config.quantization_config = {"quant_method": HF_QUANT_METHOD, "version": FORMAT_VERSION}
    atomic_write_text(directory / HF_CONFIG_FILE, config.to_json_string())
    return True

