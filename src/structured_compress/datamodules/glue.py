"""GLUE (nine tasks) from a local ``save_to_disk`` folder or the datasets cache, tokenized with the model's
tokenizer. GLUE's test labels are hidden, so ``test`` evaluates the validation split(s), as papers report."""
from __future__ import annotations

from pathlib import Path

from ..glue_tasks import glue_task
from .hf_local import load_local_dataset
from .text_classification import TextClassificationDataModule

HUB_NAME = "nyu-mll/glue"


class GlueDataModule(TextClassificationDataModule):
    """One GLUE task. Looks in ``data_dir/glue/<task>``, ``data_dir/glue_<task>``, ``path``, then the cache."""

    def __init__(self, task_name: str, tokenizer: str, data_dir: str = "data/", path: str | None = None,
                 allow_download: bool = True, **kwargs):
        task = glue_task(task_name)
        super().__init__(tokenizer=tokenizer, **kwargs)
        self.save_hyperparameters()
        self.task = task
        self.text_keys = self.task.text_keys
        self.num_labels = self.task.num_labels

    def candidate_dirs(self) -> list[Path | None]:
        base, name = Path(self.hparams.data_dir), self.hparams.task_name
        return [None if self.hparams.path is None else Path(self.hparams.path), base / "glue" / name,
                base / f"glue_{name}"]

    def load_splits(self) -> dict[str, list]:
        data = load_local_dataset(self.candidate_dirs(), HUB_NAME, self.hparams.task_name,
                                  self.hparams.allow_download)
        missing = [s for s in ("train", *self.task.eval_splits) if s not in data]
        if missing:
            raise ValueError(f"GLUE {self.hparams.task_name} data lacks split(s) {missing}; has {list(data)}")

        def prepared(split: str):
            from datasets import Value

            return data[split].cast_column("label", Value("float32")) if self.num_labels == 1 else data[split]

        evals = [prepared(s) for s in self.task.eval_splits]
        return {"train": [prepared("train")], "val": evals, "test": evals}
