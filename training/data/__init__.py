"""Data modules following pellucid's batch convention."""

from pellucid.training.data.base import PellucidDataModule, Task
from pellucid.training.data.manifest import ManifestDataModule
from pellucid.training.data.manifest_rows import ManifestError
from pellucid.training.data.medmnist import MedMNISTDataModule
from pellucid.training.data.phantom import (
    LABEL_RULE,
    PHANTOM_CLASSES,
    PHANTOM_CONCEPTS,
    PhantomConfig,
    PhantomGenerator,
)
from pellucid.training.data.phantom_datamodule import PhantomDataModule, PhantomDataset

__all__ = [
    "LABEL_RULE",
    "ManifestDataModule",
    "ManifestError",
    "MedMNISTDataModule",
    "PHANTOM_CLASSES",
    "PHANTOM_CONCEPTS",
    "PellucidDataModule",
    "PhantomConfig",
    "PhantomDataModule",
    "PhantomDataset",
    "PhantomGenerator",
    "Task",
]
