"""What push reads and how its processes talk.

The push loader over this process's shard of the unaugmented training data, and the all-gather that merges every
process's findings (a no-op with one process).

Used by :mod:`pellucid.training.prototypes.push` (push, nearest patches) and the prototype gallery.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from pellucid.models.prototype_losses import lesion_cells
from pellucid.models.prototypes import PushCandidates


class Collective:
    """All-gather across the processes of a run; a no-op wrapper when there is one process.

    Args:
        strategy: The Lightning strategy (``trainer.strategy``); ``None`` for a single process.
        world_size: Number of processes.
        rank: This process's global rank.
    """

    def __init__(self, strategy: Any = None, world_size: int = 1, rank: int = 0) -> None:
        self.strategy, self.world_size, self.rank = strategy, world_size, rank

    @classmethod
    def from_trainer(cls, trainer: pl.Trainer) -> Collective:
        """The collective of a running trainer."""
        return cls(trainer.strategy, trainer.world_size, trainer.global_rank)

    def all_gather(self, tensor: Tensor) -> Tensor:
        """(W, ...) stack of ``tensor`` from every process, in rank order."""
        if self.world_size == 1:
            return tensor.unsqueeze(0)
        return self.strategy.all_gather(tensor.contiguous()).to(tensor.device)

    def all_gather_object(self, value: Any) -> list[Any]:
        """``value`` from every process, in rank order (small picklable objects only)."""
        if self.world_size == 1:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, value)
        return gathered


class _IndexedDataset(Dataset):
    """Adds ``push_index`` (the dataset index) to every item, so provenance can name the sample."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        if not isinstance(item, dict) or "image" not in item or "id" not in item or "label" not in item:
            raise TypeError("push needs dataset items following the batch convention (a dict with image, label, id); "
                            f"got {type(item).__name__}")
        return {**item, "push_index": index}


class _ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...`` in increasing order; no padding, so no sample is seen twice."""

    def __init__(self, length: int, rank: int = 0, world_size: int = 1) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def push_dataloader(dataset: Dataset, batch_size: int, num_workers: int = 0, rank: int = 0,
                    world_size: int = 1) -> DataLoader:
    """An unshuffled loader over this process's shard of ``dataset``, items tagged with ``push_index``."""
    return DataLoader(_IndexedDataset(dataset), batch_size=batch_size, num_workers=num_workers,
                      sampler=_ShardSampler(len(dataset), rank, world_size))


def push_dataset(trainer: pl.Trainer) -> Dataset:
    """The data push reads: ``datamodule.push_dataset()`` when defined, else the training split's dataset.

    Data modules that augment their training data should define ``push_dataset()`` returning the
    unaugmented training set.

    Raises:
        ValueError: when the trainer has no data module.
    """
    datamodule = trainer.datamodule
    if datamodule is None:
        raise ValueError("PrototypePush needs the trainer to be given a datamodule (it reads the training split)")
    if callable(getattr(datamodule, "push_dataset", None)):
        return datamodule.push_dataset()
    return datamodule.train_dataloader().dataset


def batch_labels(batch: dict[str, Any]) -> Tensor:
    """(B,) class index per sample: the label, or the first positive class of a multi-label target."""
    label = batch["label"]
    return label.long() if label.ndim == 1 else label.float().argmax(dim=1)


def on_lesion(batch: dict[str, Any], candidates: PushCandidates, device: torch.device) -> Tensor:
    """(B, P or 1, N) True where a candidate lies on its image's lesion, or its image has no lesion."""
    if "mask" not in batch:
        raise KeyError(f"push within_mask: the push batches need 'mask'; they have keys {sorted(batch)}")
    cells = lesion_cells(batch["mask"].to(device), candidates.feature_size).flatten(1)  # (B, N cells)
    cells = cells | ~cells.any(dim=1, keepdim=True)  # no lesion: every patch may serve
    if candidates.feature_index is None:
        return cells.unsqueeze(1)
    return cells.unsqueeze(1).expand(-1, candidates.feature_index.shape[1], -1).gather(2, candidates.feature_index)


__all__ = ["Collective", "batch_labels", "on_lesion", "push_dataloader", "push_dataset"]
