"""The tokenizer of an exported GGUF: llama.cpp needs the vocabulary in the file (``tokenizer.*`` fields).

Where it comes from (``tokenizer=`` of :func:`export_gguf`, else found): a GGUF file or a ``gguf-package:`` source
(its ``tokenizer.*`` fields copied as they are), or a folder with Hugging Face tokenizer files (read with
gguf-py's vocab helpers: SentencePiece ``tokenizer.model``, a LLaMA-style or a BPE ``tokenizer.json``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..errors import UserInputError

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def run_model_source(folder: Path) -> str | None:
    """``model.source`` of the run that wrote a compressed ``folder`` (``<run dir>/compressed``), read from
    ``<run dir>/.hydra/config.yaml``; None when the folder has no such run beside it."""
    config = folder.parent / ".hydra" / "config.yaml"
    if not config.is_file():
        return None
    from omegaconf import OmegaConf

    source = OmegaConf.select(OmegaConf.load(config), "model.source", default=None)
    return None if source is None else str(source)


def find_tokenizer(folder: Path | None) -> str | None:
    """The tokenizer source of a compressed folder: its own tokenizer files, else its run's ``model.source``."""
    if folder is None:
        return None
    if any((folder / name).is_file() for name in TOKENIZER_FILES):
        return str(folder)
    return run_model_source(folder)


def add_tokenizer(writer: Any, source: str, vocab_size: int) -> str:
    """Write the ``tokenizer.*`` fields of ``source`` (see module doc); returns what was read, for the report."""
    from ..sources import GGUF_PREFIX, resolve_source

    if source.startswith(GGUF_PREFIX):
        return _copy_from_package(writer, source[len(GGUF_PREFIX):])
    path = Path(source).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return _copy_from_gguf(writer, path)
    folder = Path(resolve_source(source))
    return _from_hf_folder(writer, folder, vocab_size)


def _copy_from_package(writer: Any, module: str) -> str:
    """The ``tokenizer.*`` fields of the GGUF an installed package ships (assembled once into the cache)."""
    from ..sources import gguf_package_file

    _copy_from_gguf(writer, gguf_package_file(module))
    return f"gguf-package:{module}"


def _copy_from_gguf(writer: Any, path: Path) -> str:
    import gguf

    reader = gguf.GGUFReader(path)
    copied = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
        copied += 1
    if not copied:
        raise UserInputError(f"{path} holds no tokenizer.* fields; give export.tokenizer a model folder with "
                             "tokenizer files instead")
    return str(path)


def _from_hf_folder(writer: Any, folder: Path, vocab_size: int) -> str:
    """Tokens, scores, types, merges and special ids from Hugging Face tokenizer files, as llama.cpp reads them."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab, SpecialVocab

    candidates = [(SentencePieceVocab, "llama")] if (folder / "tokenizer.model").is_file() else []
    candidates += [(LlamaHfVocab, "llama"), (BpeVocab, "gpt2")]
    vocab, problems = None, []
    for kind, model in candidates:
        try:
            vocab = kind(folder)
            break
        except Exception as err:  # each helper fails its own way on files it does not read; all are listed
            problems.append(f"{kind.__name__}: {' '.join(str(err).split()) or type(err).__name__}")
    if vocab is None:
        raise UserInputError(f"no tokenizer gguf-py can read in {folder} ({'; '.join(problems)}); give "
                             "export.tokenizer=<folder with a SentencePiece, LLaMA-style or BPE tokenizer>, or "
                             "export.tokenizer=none to write the GGUF without one")
    tokens, scores, types = [], [], []
    for text, score, token_type in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(token_type)
    while len(tokens) < vocab_size:  # the embedding may have more rows than the tokenizer has tokens
        tokens.append(f"[PAD{len(tokens)}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    SpecialVocab(folder, load_merges=model == "gpt2", n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    return str(folder)
