"""What every pellucid data module exposes, so the CLI can wire a model to it.

The batch convention (one for every dataset) is a dict with:

- ``image``: (B, C, *S) float.
- ``label``: (B,) long for multi-class, (B, K) float for multi-label.
- ``mask`` (optional): (B, 1, *S) float, lesion/organ ground truth: 0/1, or class indices for segmentation.
- ``concepts`` (optional): (B, M) float in each concept's unit, NaN where not annotated.
- ``lesion_type`` (optional): (B,) long, for prototype purity.
- ``confounder_mask`` (optional): (B, 1, *S) float in {0, 1}, where a known shortcut lies.
- ``id``: list[str] of sample ids.
"""

from __future__ import annotations

from typing import Any, Literal

import pytorch_lightning as pl

from pellucid.models.concepts import ConceptSpec
from pellucid.training.data.augment import BatchAugmentation

Task = Literal["multiclass", "multilabel", "segmentation"]


class PellucidDataModule(pl.LightningDataModule):
    """A LightningDataModule that states the facts a model must be built for.

    Subclasses set these attributes in ``__init__`` (before ``setup``), because the CLI reads them right
    after instantiating the data module to build the model:

    Attributes:
        spatial_dims: 2 or 3.
        in_channels: Image channels ``C``.
        num_classes: Classes ``K``.
        task: ``"multiclass"`` (label is a class index), ``"multilabel"`` (label is a 0/1 vector) or
            ``"segmentation"`` (``mask`` holds per-pixel class indices and ``num_classes`` counts the background).
        class_names: ``K`` human-readable class names.
        concept_specs: The concepts a batch's ``concepts`` columns hold, in order (empty if none).
        augmentation: Applied to every training batch after it reached its device (``None``: no augmentation);
            validation, test, prediction and the prototype push read unaugmented samples.
    """

    spatial_dims: int
    in_channels: int
    num_classes: int
    task: Task = "multiclass"
    class_names: list[str]
    concept_specs: list[ConceptSpec]
    augmentation: BatchAugmentation | None = None
    _augment_epoch: int = -1
    _augment_batch: int = 0

    @property
    def num_concepts(self) -> int:
        """Number of annotated concepts ``M`` (0 if the dataset has none)."""
        return len(getattr(self, "concept_specs", []) or [])

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Augment training batches with :attr:`augmentation`, seeded by epoch, batch index and process rank."""
        trainer = self.trainer
        if self.augmentation is None or trainer is None or not trainer.training:
            return batch
        if trainer.current_epoch != self._augment_epoch:
            self._augment_epoch, self._augment_batch = trainer.current_epoch, 0
        self._augment_batch += 1
        return self.augmentation(batch, trainer.current_epoch, self._augment_batch - 1, trainer.global_rank)
