"""Issue 21, the manifest cases: every bad input gets one clear ManifestError, before anything is written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from pellucid.training.data import ManifestDataModule, ManifestError


def write_csv(path: Path, rows: list[dict[str, object]], encoding: str = "utf-8") -> Path:
    with path.open("w", newline="", encoding=encoding) as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def png(path: Path, size: tuple[int, int] = (8, 8), channels: int = 1, value: int = 0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = size if channels == 1 else (*size, channels)
    array = np.full(shape, value, np.uint8)
    array[0] = 200  # not constant
    Image.fromarray(array).save(path)
    return path.name


def nifti(path: Path, shape: tuple[int, ...], fill: float = 1.0) -> str:
    array = np.random.default_rng(0).random(shape).astype(np.float32)
    if fill != 1.0:
        array.flat[0] = fill
    nibabel.save(nibabel.Nifti1Image(array, np.eye(4)), path)
    return path.name


def pngs(folder: Path, labels: list[str], **columns: list[object]) -> Path:
    """A manifest of one small PNG per label, with extra columns."""
    rows = [{"image": png(folder / f"img{i}.png"), "label": label} for i, label in enumerate(labels)]
    for name, values in columns.items():
        for row, value in zip(rows, values, strict=True):
            row[name] = value
    return write_csv(folder / "manifest.csv", rows)


def problems(error: pytest.ExceptionInfo[ManifestError]) -> dict[int, str]:
    out: dict[int, str] = {}
    for row, _, reason in error.value.problems:
        out[row] = out.get(row, "") + reason + "; "
    return out


def test_case4_duplicate_ids_from_file_names_are_refused_naming_both_rows(tmp_path: Path) -> None:
    rows = [{"image": f"{folder}/scan.png", "label": label} for folder, label in (("x", "a"), ("y", "b"))]
    for row in rows:
        png(tmp_path / row["image"])
    rows += [{"image": png(tmp_path / f"other{i}.png"), "label": "ab"[i]} for i in range(2)]
    manifest = write_csv(tmp_path / "manifest.csv", rows)
    with pytest.raises(ManifestError) as caught:
        ManifestDataModule(str(manifest)).validate()
    assert list(problems(caught)) == [2]
    assert "duplicate sample id 'scan'" in str(caught.value) and "row 1 has it too" in str(caught.value)
    assert "id_column" in str(caught.value)
    rows = [dict(row, id=f"s{i}") for i, row in enumerate(rows)]  # the fix the message names
    data = ManifestDataModule(str(write_csv(tmp_path / "manifest.csv", rows)), id_column="id")
    assert [row.sample_id for row in data.validate()] == ["s0", "s1", "s2", "s3"]


def test_case6_time_series_nifti_is_refused_not_averaged_as_rgb(tmp_path: Path) -> None:
    rows = [{"image": nifti(tmp_path / f"v{i}.nii.gz", (6, 6, 6) if i else (6, 6, 6, 3)), "label": "ab"[i % 2]}
            for i in range(4)]
    manifest = write_csv(tmp_path / "manifest.csv", rows)
    with pytest.raises(ManifestError) as caught:
        ManifestDataModule(str(manifest), spatial_dims=3).validate()
    assert list(problems(caught)) == [1]
    assert "'v0.nii.gz' holds 3 volumes" in str(caught.value) and "in_channels=3" in str(caught.value)


def test_case6_patient_ids_are_trimmed_and_case_folded_so_one_patient_stays_in_one_split(tmp_path: Path) -> None:
    patients = ["p0", "p0 ", "P0"] + [f"q{i}" for i in range(9)]
    manifest = pngs(tmp_path, ["a", "b"] * 6, patient=patients)
    for seed in range(8):
        data = ManifestDataModule(str(manifest), patient_column="patient", val_fraction=0.3, test_fraction=0.3,
                                  seed=seed)
        data.setup()
        where = {split for split, indices in data.splits.items() for i in indices if data.rows[i].number <= 3}
        assert len(where) == 1, (seed, where)


def test_case6_label_typo_making_a_one_sample_class_is_refused(tmp_path: Path) -> None:
    manifest = pngs(tmp_path, ["benign", "malignant", "benign", "bengin", "malignant"])
    with pytest.raises(ManifestError) as caught:
        ManifestDataModule(str(manifest)).validate()
    assert list(problems(caught)) == [4]
    assert "'bengin'" in str(caught.value) and "did you mean 'benign'" in str(caught.value)
    declared = ManifestDataModule(str(manifest), class_names=["benign", "bengin", "malignant"])
    assert len(declared.validate()) == 5  # declared in class_names: a real one-sample class is kept


@pytest.mark.parametrize("options, field", [
    ({"spacing_mm": [0.0, 1.0]}, "spacing_mm"), ({"spacing_mm": [-1.0, 1.0]}, "spacing_mm"),
    ({"spacing_mm": [1.0, 1.0]}, "spacing_mm"),  # 2 values for 3D
    ({"spatial_size": [0, 8, 8]}, "spatial_size"), ({"spatial_size": [8, 8]}, "spatial_size")])
def test_case6_bad_spacing_and_spatial_size_are_refused_at_construction(tmp_path: Path, options, field) -> None:
    manifest = pngs(tmp_path, ["a", "b"])
    with pytest.raises(ManifestError, match=rf"option {field} must be 3 .*got \[") as caught:
        ManifestDataModule(str(manifest), spatial_dims=3, **options)
    assert "e.g." in str(caught.value)


def test_case8_mixed_sizes_without_spatial_size_are_refused_naming_rows_and_sizes(tmp_path: Path) -> None:
    rows = [{"image": png(tmp_path / f"i{i}.png", (8, 8) if i < 3 else (8, 12)), "label": "ab"[i % 2]}
            for i in range(4)]
    manifest = write_csv(tmp_path / "manifest.csv", rows)
    with pytest.raises(ManifestError) as caught:
        ManifestDataModule(str(manifest)).validate()
    assert list(problems(caught)) == [4]
    assert "image size (12, 8) differs from the most common (8, 8)" in str(caught.value)
    assert "set spatial_size, e.g. spatial_size: [8, 8]" in str(caught.value)
    data = ManifestDataModule(str(manifest), spatial_size=[8, 8], batch_size=4, val_fraction=0, test_fraction=0)
    data.setup()
    assert next(iter(data.train_dataloader()))["image"].shape == (4, 1, 8, 8)


def test_case8_rgb_mask_is_refused(tmp_path: Path) -> None:
    rows = [{"image": png(tmp_path / f"i{i}.png"), "label": "ab"[i % 2],
             "mask": png(tmp_path / f"m{i}.png", channels=3 if i == 1 else 1)} for i in range(4)]
    manifest = write_csv(tmp_path / "manifest.csv", rows)
    with pytest.raises(ManifestError) as caught:
        ManifestDataModule(str(manifest), mask_column="mask").validate()
    assert list(problems(caught)) == [2] and "mask 'm1.png' has 3 channels" in str(caught.value)


def test_case9_nan_and_inf_voxels_are_caught_naming_the_file(tmp_path: Path) -> None:
    rows = [{"image": nifti(tmp_path / f"v{i}.nii.gz", (6, 6), fill=[1.0, np.nan, np.inf, 1.0][i]),
             "label": "ab"[i % 2]} for i in range(4)]
    with pytest.raises(ManifestError) as caught:
        ManifestDataModule(str(write_csv(tmp_path / "manifest.csv", rows))).validate()
    assert list(problems(caught)) == [2, 3]
    assert "image 'v1.nii.gz' has 1 NaN/inf voxel(s)" in str(caught.value)


@pytest.mark.parametrize("content, expected", [
    ("", "no data rows"), ("image,label\n", "no data rows"), ("image;label\na.png;x\n", "separated by ';'"),
    ("image,label\na.png,\nb.png,\n", "no labels: column 'label'")])
def test_case9_empty_header_only_semicolon_and_blank_label_manifests(tmp_path: Path, content: str,
                                                                     expected: str) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(content)
    with pytest.raises(ManifestError, match=expected) as caught:
        ManifestDataModule(str(manifest))
    assert str(manifest) in str(caught.value) and "num_classes" not in str(caught.value)


def test_case9_excel_csv_with_byte_order_mark_works(tmp_path: Path) -> None:
    rows = [{"image": png(tmp_path / f"i{i}.png"), "label": "ab"[i % 2]} for i in range(4)]
    manifest = write_csv(tmp_path / "manifest.csv", rows, encoding="utf-8-sig")
    assert manifest.read_bytes().startswith(b"\xef\xbb\xbf")
    assert len(ManifestDataModule(str(manifest)).validate()) == 4


def test_case9_malformed_json_names_the_file(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.json"
    manifest.write_text('[{"image": "a.png", "label": "x"},]')
    with pytest.raises(ManifestError, match=r"(?s)manifest .*manifest\.json: .*malformed JSON at line 1"):
        ManifestDataModule(str(manifest))


def test_case9_dicom_without_pixel_data_names_the_file(tmp_path: Path) -> None:
    structure = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del structure.PixelData
    structure.Modality = "RTSTRUCT"
    structure.save_as(tmp_path / "rtstruct.dcm")
    rows = [{"image": "rtstruct.dcm", "label": "a"}] + [{"image": png(tmp_path / f"i{i}.png"), "label": "ab"[i % 2]}
                                                         for i in range(4)]
    with pytest.raises(ManifestError) as caught:
        ManifestDataModule(str(write_csv(tmp_path / "manifest.csv", rows))).validate()
    assert list(problems(caught)) == [1]
    assert "rtstruct.dcm' is a DICOM file with no image (no pixel data; modality 'RTSTRUCT'" in str(caught.value)


def test_case9_two_time_point_nifti_names_the_file_and_shape(tmp_path: Path) -> None:
    rows = [{"image": nifti(tmp_path / f"v{i}.nii.gz", (6, 6, 6, 2) if i == 2 else (6, 6, 6)), "label": "ab"[i % 2]}
            for i in range(4)]
    with pytest.raises(ManifestError) as caught:
        ManifestDataModule(str(write_csv(tmp_path / "manifest.csv", rows)), spatial_dims=3).validate()
    assert list(problems(caught)) == [3]
    assert "image 'v2.nii.gz' holds 2 volumes along its last axis (shape (2, 6, 6, 6)" in str(caught.value)


def test_case9_a_300_character_id_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    manifest = pngs(tmp_path, ["a", "b", "a", "b"], id=["x" * 300, "b", "c", "d"])
    with pytest.raises(ManifestError) as caught:
        ManifestDataModule(str(manifest), id_column="id").validate()
    assert list(problems(caught)) == [1] and "sample id has 300 characters, expected at most 128" in str(caught.value)


def test_case9_paths_resolve_against_the_manifest_folder_and_errors_name_given_and_resolved(
        tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "study"
    manifest = pngs(folder, ["a", "b"])
    monkeypatch.chdir(tmp_path)  # elsewhere: relative image paths still resolve against the manifest's folder
    assert len(ManifestDataModule("study/manifest.csv").validate()) == 2
    write_csv(manifest, [{"image": "img0.png", "label": "a"}, {"image": "scans/gone.png", "label": "b"}])
    with pytest.raises(ManifestError) as caught:
        ManifestDataModule("study/manifest.csv").validate()
    message = str(caught.value)
    assert "image 'scans/gone.png'" in message and str(folder.resolve() / "scans" / "gone.png") in message
    with pytest.raises(ManifestError, match=r"manifest file not found: 'nowhere/manifest.csv' \(resolved to '/"):
        ManifestDataModule("nowhere/manifest.csv")


def test_case11_test_split_is_stratified_by_label_within_patients_and_deterministic(tmp_path: Path) -> None:
    labels = ["common"] * 16 + ["rare"] * 8  # two images per patient: 8 common and 4 rare patients
    manifest = pngs(tmp_path, labels, patient=[f"p{i // 2}" for i in range(24)])
    for seed in range(12):
        data = ManifestDataModule(str(manifest), patient_column="patient", val_fraction=0.25, test_fraction=0.25,
                                  seed=seed)
        data.setup()
        classes = {split: sorted({data.rows[i].label for i in data.splits[split]}) for split in ("train", "val",
                                                                                                  "test")}
        assert classes == {"train": [0, 1], "val": [0, 1], "test": [0, 1]}, (seed, classes)
        again = ManifestDataModule(str(manifest), patient_column="patient", val_fraction=0.25, test_fraction=0.25,
                                   seed=seed)
        again.setup()
        assert again.splits == data.splits


def test_case11_a_class_with_one_patient_never_lands_only_in_test(tmp_path: Path) -> None:
    manifest = pngs(tmp_path, ["a"] * 6 + ["b"] * 2, patient=["p0", "p1", "p2", "p3", "p4", "p5", "p6", "p6"])
    for seed in range(12):
        data = ManifestDataModule(str(manifest), patient_column="patient", val_fraction=0.3, test_fraction=0.3,
                                  seed=seed)
        data.setup()
        assert {data.rows[i].label for i in data.splits["train"]} == {0, 1}, seed


def test_json_manifest_with_rows_key_still_reads(tmp_path: Path) -> None:
    rows = [{"image": png(tmp_path / f"i{i}.png"), "label": "ab"[i % 2]} for i in range(2)]
    (tmp_path / "manifest.json").write_text(json.dumps({"rows": rows}))
    assert len(ManifestDataModule(str(tmp_path / "manifest.json")).validate()) == 2
