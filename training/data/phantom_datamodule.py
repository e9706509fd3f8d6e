"""Torch dataset and Lightning data module over the phantom benchmark (generated on the fly, deterministic).

Each item follows the pellucid batch convention (see :mod:`pellucid.training.data.base`): ``image``, ``label``,
``mask``, ``concepts``, ``lesion_type``, ``id`` and, when the shortcut marker is enabled, ``confounder_mask`` and
``shortcut_present``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from pellucid.training.data.augment import BatchAugmentation, square_planes
from pellucid.training.data.base import PellucidDataModule, loader_order
from pellucid.training.data.phantom import (
    LABEL_RULE,
    PHANTOM_CLASSES,
    PHANTOM_CONCEPTS,
    SPLITS,
    PhantomConfig,
    PhantomGenerator,
    PointsLabelRule,
)
from pellucid.training.data.phantom_twins import TWIN_CHANGES, TwinBatch, twin_batches

PhantomItem = dict[str, Any]


class PhantomDataset(Dataset[PhantomItem]):
    """``length`` phantom samples of one split; item ``i`` is sample ``i`` of the generator's split.

    Args:
        generator: The phantom generator (holds the config and the seed).
        split: One of ``"train"``, ``"val"``, ``"test"``, ``"predict"``.
        length: Number of samples.
        cache: Keep generated items in memory (per worker process) instead of regenerating them.
    """

    def __init__(self, generator: PhantomGenerator, split: str, length: int, cache: bool = False) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise ValueError(f"length must be a non-negative integer, got {length!r}")
        self.generator = generator
        self.split = split
        self.length = length
        self.cache = cache
        self._cached_items: dict[int, PhantomItem] = {}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> PhantomItem:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for a phantom {self.split} split of {self.length}")
        index = index % self.length
        if index in self._cached_items:
            return self._cached_items[index]
        sample = self.generator.sample(self.split, index)
        item: PhantomItem = {
            "image": torch.from_numpy(sample.image),
            "label": torch.tensor(sample.label, dtype=torch.long),
            "mask": torch.from_numpy(sample.mask),
            "concepts": torch.from_numpy(sample.concepts),
            "lesion_type": torch.tensor(sample.lesion_type, dtype=torch.long),
            "id": sample.id,
        }
        if sample.confounder_mask is not None:
            item["confounder_mask"] = torch.from_numpy(sample.confounder_mask)
            item["shortcut_present"] = torch.tensor(sample.shortcut_present)
        if self.cache:
            self._cached_items[index] = item
        return item


class PhantomDataModule(PellucidDataModule):
    """The phantom benchmark as a Lightning data module: 2D or 3D scans with ground truth for all five elements.

    Args:
        spatial_dims: 2 or 3.
        seed: Seed of every split (sample ``i`` of a split depends only on seed, split and ``i``).
        image_size: Voxels per axis (one int or one per axis); default 64 (2D) or 32 (3D).
        spacing_mm: Voxel size in mm (one float or one per axis); default 1.0 (2D) or 2.0 (3D).
        num_train: Training samples.
        num_val: Validation samples.
        num_test: Test samples.
        num_predict: Prediction samples (split ``"predict"``); ``None`` means ``num_test``.
        batch_size: Samples per batch.
        num_workers: Data loader worker processes (persistent when > 0).
        p_normal: Probability of a scan without lesion.
        max_lesions: Lesions per abnormal scan are drawn from 1..max_lesions; the label follows the index lesion.
        diameter_range_mm: Range of the lesion core diameter in mm.
        noise_std: Standard deviation of the additive Gaussian noise.
        shortcut: Per split ``c``: P(marker | malignant) = c, P(marker | not malignant) = 1 - c, e.g.
            ``{"train": 0.9, "val": 0.5, "test": 0.5}``; splits left out get 0.5; ``None`` disables the marker.
        cache: Keep generated samples in memory.
        augment: Flip every training batch along each axis and turn it by quarter turns in every plane whose axes
            have equal size and spacing, drawn per sample (:class:`~pellucid.training.data.augment.BatchAugmentation`;
            no concept, label or lesion type changes).
            Validation, test, prediction and the prototype push always read unaugmented samples.
        task: ``"multiclass"``: the target is the image label (normal/benign/malignant). ``"segmentation"``: the
            target is the lesion mask (classes background/lesion, ``num_classes`` = 2).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        seed: int = 0,
        image_size: int | list[int] | None = None,
        spacing_mm: float | list[float] | None = None,
        num_train: int = 2000,
        num_val: int = 500,
        num_test: int = 500,
        num_predict: int | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        p_normal: float = 1.0 / 3.0,
        max_lesions: int = 1,
        diameter_range_mm: tuple[float, float] = (4.0, 20.0),
        noise_std: float = 0.04,
        shortcut: dict[str, float] | None = None,
        cache: bool = False,
        augment: bool = False,
        task: Literal["multiclass", "segmentation"] = "multiclass",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        config = PhantomConfig(
            spatial_dims=spatial_dims,
            image_size=tuple(image_size) if isinstance(image_size, list | tuple) else image_size,
            spacing_mm=tuple(spacing_mm) if isinstance(spacing_mm, list | tuple) else spacing_mm,
            diameter_range_mm=tuple(diameter_range_mm),
            p_normal=p_normal,
            max_lesions=max_lesions,
            noise_std=noise_std,
            shortcut=dict(shortcut) if shortcut is not None else None,
        )
        self._generator = PhantomGenerator(config, seed=seed)
        self.split_sizes = {
            "train": num_train,
            "val": num_val,
            "test": num_test,
            "predict": num_test if num_predict is None else num_predict,
        }
        for split, size in self.split_sizes.items():
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ValueError(f"num_{split} must be a non-negative integer, got {size!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        self.seed = seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache = cache
        self.spatial_dims = spatial_dims
        self.in_channels = 1
        if task not in ("multiclass", "segmentation"):
            raise ValueError(f"task must be 'multiclass' or 'segmentation', got {task!r}")
        self.task = task
        self.class_names = list(PHANTOM_CLASSES) if task == "multiclass" else ["background", "lesion"]
        self.num_classes = len(self.class_names)
        self.concept_specs = list(PHANTOM_CONCEPTS)
        self.datasets: dict[str, PhantomDataset] = {}
        # quarter turns in every plane whose two axes have equal size and spacing (the defaults: all of them)
        planes = square_planes(self._generator.config.image_size, self._generator.config.spacing_mm)
        self.augmentation = BatchAugmentation(spatial_dims, planes, seed=seed) if augment else None

    @property
    def label_rule(self) -> PointsLabelRule:
        """The rule from concepts to labels that generated every label."""
        return LABEL_RULE

    @property
    def phantom_config(self) -> PhantomConfig:
        """The validated phantom configuration (image size and spacing per axis filled in)."""
        return self._generator.config

    @property
    def phantom_generator(self) -> PhantomGenerator:
        """The generator behind every split."""
        return self._generator

    def counterfactual_twins(self, sample_ids: Sequence[str],
                             changes: Sequence[str] = TWIN_CHANGES) -> dict[str, TwinBatch]:
        """Twins of a batch's samples (its ``id``), one batch per change (the counterfactual metrics read them).

        See :mod:`pellucid.training.data.phantom_twins`. Raises ``ValueError`` for an id this data did not make.
        """
        return twin_batches(self._generator, sample_ids, changes)

    def setup(self, stage: str | None = None) -> None:
        """Create the split datasets (cheap: samples are generated when read)."""
        for split, size in self.split_sizes.items():
            if split not in self.datasets:
                self.datasets[split] = PhantomDataset(self._generator, split, size, cache=self.cache)

    def _loader(self, split: str, shuffle: bool) -> DataLoader[PhantomItem]:
        self.setup()
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            **loader_order(self.datasets[split], shuffle, self.seed),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader[PhantomItem]:
        """Training batches, shuffled in an order that depends only on ``seed`` and the epoch (resumable)."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader[PhantomItem]:
        """Validation batches in index order."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader[PhantomItem]:
        """Test batches in index order."""
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader[PhantomItem]:
        """Prediction batches (split ``"predict"``) in index order."""
        return self._loader("predict", shuffle=False)
