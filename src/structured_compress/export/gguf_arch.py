"""What writing one transformers model type as a llama.cpp architecture takes: the GGUF tensor names (gguf-py's
name map), the changes llama.cpp's converter makes to some tensors, and the hyperparameters it writes.

* LLaMA: the rows of q and k are reordered per head (llama.cpp pairs rotary dimensions ``(2i, 2i + 1)``,
  transformers pairs ``(i, i + d/2)``); transformers' GGUF loader undoes it.
* Gemma-3: RMSNorm scales by ``1 + w``; GGUF stores ``1 + w`` (transformers subtracts 1 when it loads).
* GPT-2: its ``Conv1D`` weights are ``in x out``; GGUF holds every matrix ``out x in`` (the exporter transposes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import UserInputError


@dataclass(frozen=True)
class Arch:
    """One supported model type: its llama.cpp name, tensor changes and hyperparameter writer."""

    gguf_arch: str  # gguf.MODEL_ARCH member
    norm_shift: float  # added to every norm weight
    permute_qk: bool  # reorder q/k rows for llama.cpp's rotary pairing
    hparams: Callable[[Any, Any], None]  # (transformers config, GGUFWriter)


def _rope(config: Any, kind: str | None = None) -> dict:
    """The rope parameters (of layer ``kind`` where they differ per attention type), old or new config style."""
    params = getattr(config, "rope_parameters", None) or {}
    params = params.get(kind, params) if kind else params
    return {"rope_theta": params.get("rope_theta", getattr(config, "rope_theta", 10000.0)),
            "rope_type": params.get("rope_type", "default"), "factor": params.get("factor")}


def _add_rope_scaling(writer: Any, rope: dict, model_type: str) -> None:
    import gguf

    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope["rope_type"] != "default":
        raise UserInputError(f"{model_type}: rope_type {rope['rope_type']!r} is not written to GGUF yet (only "
                             "default and linear rope are); export a model with plain rope")


def _common(config: Any, writer: Any) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)  # readers take it from the tokenizer otherwise


def _llama(config: Any, writer: Any) -> None:
    _common(config, writer)
    rope = _rope(config)
    writer.add_rope_freq_base(rope["rope_theta"])
    _add_rope_scaling(writer, rope, "llama")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_rope_dimension_count(head_dim)


LLAMA_CPP_GEMMA3_SWA_THETA = 10000.0  # llama.cpp's rope base for Gemma-3's sliding layers when the file has none
LLAMA_CPP_GEMMA3_PATTERN = 6  # llama.cpp's default: every 6th Gemma-3 layer attends globally


def _gemma3(config: Any, writer: Any) -> None:
    _common(config, writer)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    full, sliding = _rope(config, "full_attention"), _rope(config, "sliding_attention")
    writer.add_rope_freq_base(full["rope_theta"])
    _add_rope_scaling(writer, full, "gemma3")
    writer.add_sliding_window(config.sliding_window)
    if sliding["rope_theta"] != LLAMA_CPP_GEMMA3_SWA_THETA:
        writer.add_rope_freq_base_swa(sliding["rope_theta"])
    swa = [kind == "sliding_attention" for kind in config.layer_types]
    if swa != [(i + 1) % LLAMA_CPP_GEMMA3_PATTERN != 0 for i in range(len(swa))]:
        writer.add_sliding_window_pattern(swa)


def _gpt2(config: Any, writer: Any) -> None:
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_vocab_size(config.vocab_size)


ARCHS = {
    "llama": Arch("LLAMA", 0.0, True, _llama),
    "gemma3_text": Arch("GEMMA3", 1.0, False, _gemma3),
    "gpt2": Arch("GPT2", 0.0, False, _gpt2),
}


def arch_of(config: Any) -> Arch:
    """The :class:`Arch` of a transformers config, or a UserInputError naming the supported types."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise UserInputError(f"GGUF export supports model types {', '.join(ARCHS)}; this model is {model_type!r}. "
                             "Others need their own tensor and hyperparameter mapping (export/gguf_arch.py)")
    return ARCHS[model_type]


def name_map(arch: Arch, config: Any) -> Callable[[str], str]:
    """``hf_name -> gguf_name`` (``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight``);
    a tensor gguf-py has no name for is a UserInputError."""
    import gguf

    mapping = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf_arch], config.num_hidden_layers)

    def gguf_name(hf_name: str) -> str:
        stem, _, suffix = hf_name.rpartition(".")
        name = mapping.get_name(stem)
        if name is None:
            raise UserInputError(f"tensor {hf_name!r} has no GGUF name for architecture {arch.gguf_arch.lower()} "
                                 "(gguf-py's tensor name map); the model has a part llama.cpp does not know")
        return f"{name}.{suffix}"

    return gguf_name


def row_order(arch: Arch, config: Any, gguf_name: str, rows: int) -> np.ndarray | None:
    """The row order llama.cpp's converter gives tensor ``gguf_name`` (None: unchanged): LLaMA's q and k rows
    grouped per head as ``(head, 2, d/2) -> (head, d/2, 2)``."""
    if not arch.permute_qk or not gguf_name.endswith(("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias")):
        return None
    heads = config.num_attention_heads if ".attn_q." in gguf_name else config.num_key_value_heads
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)


def shift(arch: Arch, gguf_name: str) -> float:
    """What llama.cpp's converter adds to tensor ``gguf_name`` (Gemma's norms: 1)."""
    return arch.norm_shift if gguf_name.endswith("norm.weight") else 0.0
