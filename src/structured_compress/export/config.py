"""``export.*`` of ``mode=export`` as a typed config: each option's type, default, doc and range in one place,
checked at compose time (``run_checks.py``) and when the mode runs. Torch-free."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal, Mapping

from ..typed_config import TypedConfig, option

GgufType = Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
TYPES: tuple[str, ...] = typing.get_args(GgufType)  # what gguf-py can both write and read back
FLOAT_TYPES = ("f32", "f16", "bf16")


@dataclasses.dataclass
class ExportConfig(TypedConfig):
    """What ``python run.py mode=export ckpt_path=<compressed folder>`` writes (configs/mode/export.yaml)."""

    format: Literal["gguf"] = option("gguf", "file format: gguf (llama.cpp, transformers' gguf_file=)")
    type: GgufType = option("f16", "GGUF type of the weights that cannot be written from their codes "
                            "(vectors are always f32)")
    out: str = option("model", "file name in the run folder, without extension")
    tokenizer: str | None = option(None, "tokenizer source: a .gguf file, gguf-package:<module>, a folder with "
                                   "tokenizer files, none (write none); null = the folder's own, else its run's "
                                   "model.source")

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> "ExportConfig":
        """The config from the ``export`` mapping, naming an unknown key and the closest valid one."""
        config = dict(config or {})
        cls.check_keys(config, [f.name for f in dataclasses.fields(cls)], "export")
        return cls(**config)
