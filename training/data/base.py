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

from collections.abc import Iterator, Sized
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import Sampler

from pellucid.models.concepts import ConceptSpec
from pellucid.training.data.augment import BatchAugmentation

Task = Literal["multiclass", "multilabel", "segmentation"]


class EpochShuffleSampler(Sampler[int]):
    """A shuffle whose order is a function of ``(seed, epoch)`` alone, so a resumed fit replays the same epochs.

    A ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))`` advances one generator across
    epochs: a fit resumed from a checkpoint starts that generator afresh and replays epoch 0's order, so it no longer
    matches the uninterrupted run. Here epoch ``e`` draws its permutation from a generator seeded by
    ``SeedSequence([seed, e])``; Lightning calls :meth:`set_epoch` before every training epoch (under DDP its
    distributed wrapper shards the order).

    Args:
        data_source: The dataset (only its length is read).
        seed: Base seed of every epoch's order.
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        self.data_source, self.seed, self.epoch = data_source, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order of training epoch ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.data_source)

    def __iter__(self) -> Iterator[int]:
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(2, np.uint32)
        generator = torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


def loader_order(dataset: Sized, shuffle: bool, seed: int) -> dict[str, Any]:
    """``DataLoader`` keyword arguments for a split's order: an :class:`EpochShuffleSampler` when shuffled.

    The generator (seeded by ``seed``) also seeds the loader's workers, so no draw comes from the global random state.
    """
    return {"sampler": EpochShuffleSampler(dataset, seed) if shuffle else None,
            "generator": torch.Generator().manual_seed(seed)}


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
