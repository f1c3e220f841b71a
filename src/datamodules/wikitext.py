"""WikiText-2 / WikiText-103 (raw) from a local ``save_to_disk`` folder or the datasets cache."""
from __future__ import annotations

from pathlib import Path

from .hf_local import load_local_dataset
from .language_modeling import LanguageModelingDataModule

HUB_NAME = "Salesforce/wikitext"
CONFIGS = {"wikitext2": "wikitext-2-raw-v1", "wikitext103": "wikitext-103-raw-v1"}


class WikiTextDataModule(LanguageModelingDataModule):
    """``name``: wikitext2 | wikitext103. Looks in ``path``, ``data_dir/wikitext/<config>``, ``data_dir/<name>``."""

    def __init__(self, name: str, tokenizer: str, data_dir: str = "data/", path: str | None = None,
                 allow_download: bool = True, **kwargs):
        if name not in CONFIGS:
            raise ValueError(f"unknown WikiText variant {name!r}; use one of {sorted(CONFIGS)}")
        super().__init__(tokenizer=tokenizer, **kwargs)
        self.save_hyperparameters()

    def candidate_dirs(self) -> list[Path | None]:
        base = Path(self.hparams.data_dir)
        return [None if self.hparams.path is None else Path(self.hparams.path),
                base / "wikitext" / CONFIGS[self.hparams.name], base / self.hparams.name]

    def load_texts(self) -> dict[str, list[str]]:
        data = load_local_dataset(self.candidate_dirs(), HUB_NAME, CONFIGS[self.hparams.name],
                                  self.hparams.allow_download)
        return {"train": data["train"]["text"], "val": data["validation"]["text"], "test": data["test"]["text"]}
