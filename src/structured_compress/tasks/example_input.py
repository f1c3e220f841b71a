"""``example_input_array`` from the data: Lightning's model summary counts FLOPs only for a module that has one
(0 otherwise), and the input's shape is known only once the datamodule is set up."""
from __future__ import annotations

from typing import Any


class ExampleInputFromData:
    """LightningModule mixin: at ``setup("fit")``, one sample of the first validation batch, as ``forward``
    takes it, becomes ``example_input_array``."""

    def example_input(self, batch: Any) -> Any:
        """One sample of what ``forward`` takes: by default the first row of the task's ``model_inputs``."""
        return self.model_inputs(batch)[:1]

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if stage != "fit" or self.example_input_array is not None or datamodule is None:
            return
        loader = datamodule.val_dataloader()
        if isinstance(loader, (list, tuple)):  # several evaluation sets (MNLI matched / mismatched)
            loader = loader[0]
        self.example_input_array = self.example_input(next(iter(loader)))
