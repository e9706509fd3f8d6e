"""MedMNISTDataModule on small files in MedMNIST's layout (synthetic arrays; nothing is downloaded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pellucid.training.data import MedMNISTDataModule


def write_npz(path, image_shape: tuple[int, ...], labels: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in (("train", 6), ("val", 3), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, *image_shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = labels[:count]
    np.savez(path, **arrays)


def test_2d_rgb_multiclass(tmp_path) -> None:
    write_npz(tmp_path / "pathmnist.npz", (28, 28, 3), np.arange(6).reshape(6, 1) % 9)
    data = MedMNISTDataModule("pathmnist", root=str(tmp_path), batch_size=4)
    assert (data.spatial_dims, data.in_channels, data.num_classes, data.task) == (2, 3, 9, "multiclass")
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (4, 3, 28, 28) and float(batch["image"].max()) <= 1.0
    assert batch["label"].dtype == torch.long and batch["id"][0].startswith("pathmnist-train-")
    assert len(data.test_dataloader().dataset) == 4


def test_chestmnist_is_multilabel_and_sizes_pick_the_file(tmp_path) -> None:
    labels = (np.arange(6 * 14).reshape(6, 14) % 3 == 0).astype(np.uint8)
    write_npz(tmp_path / "chestmnist_64.npz", (64, 64), labels)
    data = MedMNISTDataModule("chestmnist", root=str(tmp_path), size=64, batch_size=2)
    assert (data.task, data.num_classes, data.in_channels) == ("multilabel", 14, 1)
    batch = next(iter(data.val_dataloader()))
    assert batch["image"].shape == (2, 1, 64, 64)
    assert batch["label"].shape == (2, 14) and batch["label"].dtype == torch.float32


def test_3d_volumes(tmp_path) -> None:
    write_npz(tmp_path / "nodulemnist3d.npz", (28, 28, 28), np.arange(6).reshape(6, 1) % 2)
    data = MedMNISTDataModule("nodulemnist3d", root=str(tmp_path), batch_size=3)
    assert (data.spatial_dims, data.num_classes) == (3, 2)
    assert next(iter(data.test_dataloader()))["image"].shape == (3, 1, 28, 28, 28)


def test_missing_file_says_where_and_how(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"expected '.*organmnist3d_64.npz'.*does not download.*medmnist"):
        MedMNISTDataModule("organmnist3d", root=str(tmp_path), size=64)
    np.savez(tmp_path / "bloodmnist.npz", train_images=np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(ValueError, match=r"not a MedMNIST file, missing arrays \['train_labels'"):
        MedMNISTDataModule("bloodmnist", root=str(tmp_path))
