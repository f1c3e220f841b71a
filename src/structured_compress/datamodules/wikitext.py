"""WikiText-2 / WikiText-103 (raw): the WikiText rows of the corpus table in ``text_corpus.py``."""
from __future__ import annotations

from .text_corpus import TextCorpusDataModule


class WikiTextDataModule(TextCorpusDataModule):
    """``name``: wikitext2 | wikitext103. Looks in ``path``, ``data_dir/wikitext/<config>``, ``data_dir/<name>``."""

    NAMES = ("wikitext2", "wikitext103")
