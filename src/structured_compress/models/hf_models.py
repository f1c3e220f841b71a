"""Hugging Face transformers built from config: sequence classifiers (GLUE, tweets), causal LMs and bare
encoders (their pooled embeddings, for post-training comparisons)."""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..sources import resolve_source

log = logging.getLogger(__name__)

KINDS = ("sequence_classification", "causal_lm", "encoder")


def create_hf_model(source: str, kind: str = "sequence_classification", num_labels: int | None = None,
                    dtype: str = "float32", empty_weights: bool = False, **config_overrides) -> nn.Module:
    """``AutoModelFor{SequenceClassification,CausalLM}.from_pretrained``, or ``AutoModel`` for ``kind="encoder"``,
    for a source string (see structured_compress.sources).

    ``num_labels=1`` makes a regression head (STS-B). ``config_overrides`` set config fields such as
    ``hidden_dropout_prob``. The classification head of a backbone-only checkpoint is freshly initialised.
    ``empty_weights``: a causal LM's skeleton with its parameters on the meta device (nothing read or
    allocated), for block-by-block compression that reads the weights later (``io.dense_weights``).
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    if kind not in KINDS:
        raise ValueError(f"model kind {kind!r} unknown; use one of {KINDS}")
    path = resolve_source(source)
    kwargs = dict(config_overrides, dtype=getattr(torch, dtype))
    if empty_weights:
        from accelerate import init_empty_weights
        from transformers import AutoConfig

        if kind != "causal_lm":
            raise ValueError(f"empty_weights builds causal LM skeletons only, not kind={kind!r}")
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, **config_overrides),
                                                     dtype=kwargs["dtype"])
        model.tie_weights()  # from_config leaves a tied head as a second parameter (counted twice) until tied
        return model.train()
    if kind == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    elif kind == "encoder":
        model = AutoModel.from_pretrained(path, **kwargs)
    else:
        if num_labels is None:
            raise ValueError("a sequence_classification model needs num_labels (1 for regression)")
        problem = "regression" if num_labels == 1 else "single_label_classification"
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                                   problem_type=problem, **kwargs)
        if model.config.pad_token_id is None and model.config.eos_token_id is not None:
            model.config.pad_token_id = model.config.eos_token_id  # GPT-style models: pad with EOS
    model.train()  # from_pretrained returns eval mode; Lightning keeps each module's mode, so dropout would stay off
    log.info("loaded %s (%s, %.1fM parameters) from %s", type(model).__name__, kind,
             sum(p.numel() for p in model.parameters()) / 1e6, path)
    return model
