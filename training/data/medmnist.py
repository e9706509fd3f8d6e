"""``MedMNISTDataModule``: MedMNIST ``.npz`` files the user already has, read offline.

MedMNIST (Yang et al., Scientific Data 2023, https://medmnist.com) ships each dataset as one ``{flag}.npz``
(28 px) or ``{flag}_{size}.npz`` (64, 128, 224 px; 3D: 64) with ``train/val/test_images`` and ``_labels``.
pellucid never downloads them: put the files in ``root`` (``pip install medmnist`` then
``python -m medmnist download`` fetches them, or take them from the dataset's Zenodo record).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pellucid.training.data.base import PellucidDataModule, loader_order

# Classes per MedMNIST v2 dataset (ChestMNIST is multi-label over 14 findings).
MEDMNIST_CLASSES = {
    "pathmnist": 9, "chestmnist": 14, "dermamnist": 7, "octmnist": 4, "pneumoniamnist": 2, "retinamnist": 5,
    "breastmnist": 2, "bloodmnist": 8, "tissuemnist": 8, "organamnist": 11, "organcmnist": 11, "organsmnist": 11,
    "organmnist3d": 11, "nodulemnist3d": 2, "adrenalmnist3d": 2, "fracturemnist3d": 3, "vesselmnist3d": 2,
    "synapsemnist3d": 2,
}
MULTILABEL_FLAGS = {"chestmnist"}
SPLITS = {"train": "train", "val": "val", "test": "test", "predict": "test"}


class _ArraySplit(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, multilabel: bool, prefix: str) -> None:
        self.images, self.labels, self.multilabel, self.prefix = images, labels, multilabel, prefix

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image = torch.from_numpy(np.asarray(self.images[index], dtype=np.float32) / 255.0)
        image = image.movedim(-1, 0) if image.ndim == 3 and image.shape[-1] == 3 else image.unsqueeze(0)
        label = self.labels[index]
        target = torch.tensor(label, dtype=torch.float32) if self.multilabel else torch.tensor(int(label[0]))
        return {"image": image, "label": target, "id": f"{self.prefix}-{index:06d}"}


class MedMNISTDataModule(PellucidDataModule):
    """One MedMNIST dataset (2D or 3D, multi-class or multi-label) from a local ``.npz`` file.

    Args:
        flag: Dataset name, e.g. ``"pathmnist"``, ``"chestmnist"``, ``"organmnist3d"``.
        root: Folder holding the ``.npz`` files.
        size: Image size of the file (``None`` = the 28 px ``{flag}.npz``; else ``{flag}_{size}.npz``).
        batch_size: Samples per batch.
        num_workers: Data loader workers.
        seed: Seed of the training shuffle.
    """

    def __init__(self, flag: str, root: str = "~/.medmnist", size: int | None = None, batch_size: int = 64,
                 num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.flag = flag.lower()
        name = f"{self.flag}.npz" if size is None else f"{self.flag}_{size}.npz"
        self.path = Path(root).expanduser() / name
        if not self.path.is_file():
            raise FileNotFoundError(
                f"MedMNIST file not found: expected {str(self.path)!r}. pellucid does not download data; get it with "
                f"`pip install medmnist && python -m medmnist download` (or from the MedMNIST Zenodo record) and "
                f"put {name} in {str(Path(root).expanduser())!r}, or pass root=<folder>."
            )
        with np.load(self.path) as archive:
            missing = [k for k in ("train_images", "train_labels", "val_images", "val_labels", "test_images",
                                   "test_labels") if k not in archive.files]
            if missing:
                raise ValueError(f"{self.path}: not a MedMNIST file, missing arrays {missing}")
            labels, images_shape = archive["train_labels"], archive["train_images"].shape
        self.task = "multilabel" if self.flag in MULTILABEL_FLAGS or labels.shape[1] > 1 else "multiclass"
        self.spatial_dims = 3 if self.flag.endswith("3d") else 2
        rgb = self.spatial_dims == 2 and len(images_shape) == 4 and images_shape[-1] == 3
        self.in_channels = 3 if rgb else 1
        inferred = labels.shape[1] if self.task == "multilabel" else int(labels.max()) + 1
        self.num_classes = MEDMNIST_CLASSES.get(self.flag, inferred)
        self.class_names = [f"class{i}" for i in range(self.num_classes)]
        self.concept_specs = []
        self._splits: dict[str, _ArraySplit] = {}

    def setup(self, stage: str | None = None) -> None:
        """Load the arrays (once)."""
        if self._splits:
            return
        with np.load(self.path) as archive:
            for split, source in SPLITS.items():
                self._splits[split] = _ArraySplit(archive[f"{source}_images"], archive[f"{source}_labels"],
                                                  self.task == "multilabel", f"{self.flag}-{source}")

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        return DataLoader(self._splits[split], batch_size=self.hparams.batch_size,
                          **loader_order(self._splits[split], shuffle, self.hparams.seed),
                          num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        """Training batches (shuffled)."""
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches."""
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        """Test batches."""
        return self._loader("test", False)

    def predict_dataloader(self) -> DataLoader:
        """The test split, for prediction."""
        return self._loader("predict", False)
