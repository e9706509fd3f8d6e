"""Tiny in-memory data for tests that do not need the phantom benchmark."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from pellucid.models import ConceptSpec
from pellucid.training.data.base import PellucidDataModule, Task

SIZES = {2: (32, 32), 3: (16, 16, 16)}


def make_batch(spatial_dims: int, batch_size: int = 2, in_channels: int = 1, num_classes: int = 3,
               task: Task = "multiclass", seed: int = 0, concepts: list[ConceptSpec] | None = None) -> dict:
    """A batch following the batch convention, with every optional key present.

    ``concepts`` sets the concept columns: 0/1 for binary concepts, values in [0, 20) for continuous ones
    (default: one binary and one continuous concept).
    """
    g = torch.Generator().manual_seed(seed)
    size = SIZES[spatial_dims]
    if task == "multiclass":
        label = torch.randint(0, num_classes, (batch_size,), generator=g)
    else:
        label = (torch.rand(batch_size, num_classes, generator=g) > 0.5).float()
    mask = (torch.rand(batch_size, 1, *size, generator=g) > 0.8).float()
    specs = concepts or [ConceptSpec("a", "binary"), ConceptSpec("b", "continuous", unit="mm")]
    columns = [
        (torch.rand(batch_size, generator=g) > 0.5).float() if spec.kind == "binary"
        else 20 * torch.rand(batch_size, generator=g)
        for spec in specs
    ]
    return {
        "image": torch.randn(batch_size, in_channels, *size, generator=g),
        "label": label,
        "mask": mask,
        "concepts": torch.stack(columns, dim=1),
        "lesion_type": torch.randint(0, 3, (batch_size,), generator=g),
        "id": [f"sample-{seed}-{i}" for i in range(batch_size)],
    }


class _Samples(Dataset):
    def __init__(self, batch: dict) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return self.batch["image"].shape[0]

    def __getitem__(self, index: int) -> dict:
        return {k: (v[index] if isinstance(v, torch.Tensor) else v[index]) for k, v in self.batch.items()}


class RandomDataModule(PellucidDataModule):
    """Learnable toy data: the class is encoded in the mean intensity, so a few steps improve the loss."""

    def __init__(self, spatial_dims: int = 2, num_samples: int = 16, batch_size: int = 4, num_classes: int = 3,
                 task: Task = "multiclass", in_channels: int = 1) -> None:
        super().__init__()
        self.spatial_dims, self.in_channels, self.num_classes, self.task = spatial_dims, in_channels, num_classes, task
        self.class_names = [f"class{i}" for i in range(num_classes)]
        self.concept_specs = [ConceptSpec("a", "binary"), ConceptSpec("b", "continuous", unit="mm")]
        batch = make_batch(spatial_dims, num_samples, in_channels, num_classes, task)
        level = batch["label"].float() if task == "multiclass" else batch["label"][:, 0]
        batch["image"] = batch["image"] * 0.1 + level.view(-1, *[1] * (spatial_dims + 1))
        self.data = _Samples(batch)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)

    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader
