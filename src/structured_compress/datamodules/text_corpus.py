"""Language-modelling corpora of the perplexity tables -- WikiText-2/103 (raw), Penn Treebank, C4 -- from a local
``save_to_disk`` folder or the datasets cache first, the hub only when online.

Each corpus is one row of :data:`CORPORA`: where the hub keeps it, which field holds the text, which hub split
serves each of train / val / test (with a document cap where the protocol has one) and the separator that
joins documents. PTB and C4 follow GPTQ's ``datautils`` (the protocol of the OPT tables): PTB sentences joined
by a space, its validation split as the test text; C4 from one train and one validation shard, the test text
the first 1100 validation documents joined by a space (the datamodule config caps it at 256 windows).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .hf_local import load_local_dataset
from .language_modeling import LanguageModelingDataModule


@dataclass(frozen=True)
class Corpus:
    """Where one corpus lives on the hub and how its splits become train / val / test text."""

    hub_name: str
    config_name: str | None
    folder: str  # under data_dir
    text_key: str
    splits: dict[str, tuple[str, int | None]]  # our split -> (hub split, first N documents or None)
    separator: str = "\n\n"
    data_files: dict[str, str] | None = field(default=None)


WIKITEXT_SPLITS = {"train": ("train", None), "val": ("validation", None), "test": ("test", None)}
CORPORA = {
    "wikitext2": Corpus("Salesforce/wikitext", "wikitext-2-raw-v1", "wikitext/wikitext-2-raw-v1", "text",
                        WIKITEXT_SPLITS),
    "wikitext103": Corpus("Salesforce/wikitext", "wikitext-103-raw-v1", "wikitext/wikitext-103-raw-v1", "text",
                          WIKITEXT_SPLITS),
    "ptb": Corpus("ptb-text-only/ptb_text_only", "penn_treebank", "ptb/penn_treebank", "sentence",
                  {"train": ("train", None), "val": ("validation", None), "test": ("validation", None)}, " "),
    "c4": Corpus("allenai/c4", None, "c4/en", "text",
                 {"train": ("train", None), "val": ("validation", 1100), "test": ("validation", 1100)}, " ",
                 {"train": "en/c4-train.00000-of-01024.json.gz",
                  "validation": "en/c4-validation.00000-of-00008.json.gz"}),
}


class TextCorpusDataModule(LanguageModelingDataModule):
    """``name``: a key of :data:`CORPORA`. Looks in ``path``, ``data_dir/<corpus folder>``, ``data_dir/<name>``,
    then the datasets cache. ``max_train_docs`` keeps the first training documents only (C4's one shard holds
    356k); the evaluation text is never cut here (``max_eval_windows`` does that)."""

    NAMES: tuple[str, ...] = tuple(CORPORA)

    def __init__(self, name: str, tokenizer: str, data_dir: str = "data/", path: str | None = None,
                 allow_download: bool = True, max_train_docs: int | None = None, **kwargs):
        if name not in self.NAMES:
            raise ValueError(f"datamodule.name={name!r} is not a known corpus; use one of {list(self.NAMES)}")
        kwargs.setdefault("separator", CORPORA[name].separator)
        super().__init__(tokenizer=tokenizer, **kwargs)
        self.save_hyperparameters()

    @property
    def corpus(self) -> Corpus:
        return CORPORA[self.hparams.name]

    def candidate_dirs(self) -> list[Path | None]:
        base = Path(self.hparams.data_dir)
        return [None if self.hparams.path is None else Path(self.hparams.path), base / self.corpus.folder,
                base / self.hparams.name]

    def load_texts(self) -> dict[str, list[str]]:
        corpus = self.corpus
        data = load_local_dataset(self.candidate_dirs(), corpus.hub_name, corpus.config_name,
                                  self.hparams.allow_download, data_files=corpus.data_files)
        texts = {}
        for split, (hub_split, first) in corpus.splits.items():
            limit = self.hparams.max_train_docs if split == "train" else first
            rows = data[hub_split] if limit is None else data[hub_split].select(range(min(limit, len(data[hub_split]))))
            texts[split] = rows[corpus.text_key]
        return texts
