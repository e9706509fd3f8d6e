"""ManifestDataModule on real images that installed packages ship (DICOM, NIfTI, PNG, JPEG)."""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel
import numpy as np
import pytest
import torch
from monai.transforms import Compose, LoadImage, Orientation, Spacing

from pellucid.training.cli import main
from pellucid.training.data import ManifestDataModule, ManifestError
from pellucid.training.data.example_data import write_example_2d, write_example_3d

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
CONCEPT = [{"name": "bright_fraction", "kind": "continuous", "unit": "%"}]


@pytest.fixture(scope="module")
def example_2d(tmp_path_factory) -> Path:
    return write_example_2d(tmp_path_factory.mktemp("own2d"))


@pytest.fixture(scope="module")
def example_3d(tmp_path_factory) -> Path:
    return write_example_3d(tmp_path_factory.mktemp("own3d"))


def module_2d(manifest: Path, **kwargs) -> ManifestDataModule:
    options = dict(spatial_dims=2, mask_column="mask", patient_column="patient", concepts=CONCEPT,
                   spatial_size=[32, 32], val_fraction=0.2, test_fraction=0.2, batch_size=4)
    options.update(kwargs)
    return ManifestDataModule(str(manifest), **options)


def test_2d_manifest_batches_follow_the_convention(example_2d: Path) -> None:
    data = module_2d(example_2d)
    assert (data.class_names, data.num_classes, data.task) == (["ct", "fundus"], 2, "multiclass")
    assert [c.unit for c in data.concept_specs] == ["%"]
    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (4, 1, 32, 32) and batch["image"].dtype == torch.float32
    assert 0.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0
    assert set(torch.unique(batch["mask"]).tolist()) <= {0.0, 1.0}
    assert batch["label"].dtype == torch.long and batch["concepts"].shape == (4, 1)
    assert all(isinstance(i, str) and "." not in i for i in batch["id"])


def test_patient_level_split_keeps_each_patient_in_one_split(example_2d: Path) -> None:
    data = module_2d(example_2d)
    data.setup()
    patients = {split: {data.rows[i].patient for i in indices} for split, indices in data.splits.items()}
    assert patients["train"] and patients["val"] and patients["test"]
    assert not (patients["train"] & patients["val"]) and not (patients["train"] & patients["test"])
    assert not (patients["val"] & patients["test"])
    assert sum(len(v) for v in data.splits.values()) == len(data.rows) == 10


def test_3d_manifest_reads_nifti_and_dicom_series(example_3d: Path) -> None:
    data = ManifestDataModule(str(example_3d), spatial_dims=3, patient_column="patient", orientation="RAS",
                              spacing_mm=[2.0, 2.0, 2.0], spatial_size=[16, 16, 16], batch_size=8,
                              val_fraction=0.25, test_fraction=0.25)
    data.setup()
    series = [row for row in data.rows if row.image.is_dir()]
    assert len(series) == 4 and data.class_names == ["ct", "mr"]
    loaded = data.dataset("train")[0]
    assert loaded["image"].shape == (1, 16, 16, 16)
    # the affine of the volume as the model sees it: resampled to 2 mm, then resized to 16 voxels per axis
    resampled = Compose([LoadImage(image_only=True, ensure_channel_first=True), Orientation(axcodes="RAS"),
                         Spacing(pixdim=[2.0, 2.0, 2.0])])(str(data.rows[data.splits["train"][0]].image))
    voxel_mm = torch.linalg.norm(loaded["affine"][:3, :3], dim=0)
    expected = 2.0 * torch.tensor(resampled.shape[1:], dtype=torch.float64) / 16
    torch.testing.assert_close(voxel_mm, expected, rtol=1e-3, atol=1e-3)
    assert loaded["affine"].dtype == torch.float64 and loaded["affine"][3].tolist() == [0.0, 0.0, 0.0, 1.0]


def test_every_bad_row_is_named_in_one_error(example_2d: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    shutil.copytree(example_2d.parent, folder)
    (folder / "broken.png").write_bytes(b"not an image at all")
    nibabel.save(nibabel.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), folder / "volume.nii.gz")
    rows = list(csv.DictReader((folder / "manifest.csv").open()))
    rows[1]["image"] = "missing.dcm"                      # row 2: missing file
    rows[2]["image"] = "broken.png"                       # row 3: unreadable image
    rows[3]["image"] = "volume.nii.gz"                    # row 4: wrong dimensionality
    rows[4]["mask"] = "ct_0_mask.png"                     # row 5: a 128x128 mask for a 256x256 image
    rows[5]["label"] = "xray"                             # row 6: unknown label
    rows[6]["bright_fraction"] = "lots"                   # row 7: non-numeric concept
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    data = module_2d(folder / "manifest.csv", class_names=["ct", "fundus"])
    with pytest.raises(ManifestError) as caught:
        data.validate()
    reasons: dict[int, str] = {}
    for row, _, reason in caught.value.problems:
        reasons[row] = reasons.get(row, "") + reason + "; "
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7]
    assert "missing file" in reasons[2] and "unreadable image" in reasons[3]
    assert "wrong dimensionality: expected 2 spatial axes" in reasons[4]
    assert "mask shape differs from image: mask (128, 128), image (256, 256)" in reasons[5]
    assert "unknown label 'xray'" in reasons[6] and "non-numeric concept 'bright_fraction'" in reasons[7]
    message = str(caught.value)
    assert "6 bad row(s)" in message and "row 6 (id 'retina_1')" in message


def test_patient_in_two_explicit_splits_is_a_bad_row(example_2d: Path, tmp_path: Path) -> None:
    rows = list(csv.DictReader(example_2d.open()))
    for row, split in zip(rows, ["train", "test"] + ["train"] * (len(rows) - 2), strict=True):
        row["split"] = split
    path = example_2d.parent / "split_manifest.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(ManifestError, match=r"row 2 .*patient 'ct-p0' is in split 'test' here and in split 'train'"):
        module_2d(path, split_column="split").validate()


def test_own_data_example_config_fits_through_the_cli(example_2d: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["pellucid"])
    main(["fit", "--config", str(EXAMPLES / "own_data_2d.yaml"), f"--data.init_args.manifest={example_2d}",
          "--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false"])


def test_manifest_augmentation_turns_only_where_axes_are_alike(example_2d: Path) -> None:
    assert module_2d(example_2d).augmentation is None  # off by default: flips swap left and right
    data = module_2d(example_2d, augment=True)
    assert data.augmentation.planes == [(0, 1)]
    assert module_2d(example_2d, augment=True, spatial_size=[32, 48]).augmentation.planes == []
    volume = ManifestDataModule(str(example_2d), spatial_dims=3, spatial_size=[16, 16, 16], augment=True)
    assert volume.augmentation.planes == [(0, 1)]  # voxel size unknown: in-plane turns only
    spaced = ManifestDataModule(str(example_2d), spatial_dims=3, spatial_size=[16, 16, 16], spacing_mm=[1, 1, 1],
                                augment=True)
    assert spaced.augmentation.planes == [(0, 1), (0, 2), (1, 2)]
    data.setup()
    batch = next(iter(data.train_dataloader()))
    data.trainer = SimpleNamespace(training=True, current_epoch=0, global_rank=0)
    out = data.on_after_batch_transfer(batch, 0)
    for i in range(batch["image"].shape[0]):  # image and mask moved together, voxel values kept
        inside = [(b["image"][i] * b["mask"][i]).sum() for b in (out, batch)]
        torch.testing.assert_close(*inside)
        assert torch.equal(out["image"][i].flatten().sort().values, batch["image"][i].flatten().sort().values)
