"""ExplanationWriter(dicom=True): a Segmentation and colour overlays that reference their DICOM source, on its grid.

Synthetic DICOM images (pydicom, written here) carry a bright block at known pixels, with anisotropic pixel spacing,
an offset origin and, for the 3D series, slice files in shuffled order. A toy model's localization map is the image
itself, so the thresholded map must land on the block's source pixels whatever the data pipeline resized; the output
is read back with pydicom and highdicom and its references and geometry are compared with the source.
"""

from __future__ import annotations

import csv
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import pytorch_lightning as pl
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from synthetic import RandomDataModule
from torch import Tensor, nn

from pellucid.models import InterpretableModel, ModelOutput
from pellucid.models.registry import ModelSpec
from pellucid.training import InterpretableModule
from pellucid.training.cli import main
from pellucid.training.data import ManifestDataModule
from pellucid.training.outputs.dicom import DicomOutputError
from pellucid.training.outputs.writer import ExplanationWriter
from pellucid.training.outputs.writer_folder import RUN_FILE, explanation_files
from pellucid.training.outputs.writer_index import read_index

ROWS, COLUMNS = 24, 40
BLOCK = (slice(6, 14), slice(20, 32))  # rows 6-13, columns 20-31
SPACING = (0.8, 0.5)  # mm between rows, between columns
ORIGIN = (-50.0, -30.0, 10.0)
SLICE_MM = 2.0
BLOCK_SLICES = (2, 3)


def write_slice(path: Path, pixels: np.ndarray, series: str, study: str, frame: str, number: int) -> Dataset:
    """One CT image (16-bit, axial, anisotropic pixels) at slice ``number`` of a series."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "P1", "Test^Patient", "", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "", "", "1", "", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, number + 1
    ds.ImagePositionPatient = [ORIGIN[0], ORIGIN[1], ORIGIN[2] + SLICE_MM * number]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing, ds.SliceThickness = list(SPACING), SLICE_MM
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


def block_image(present: bool = True) -> np.ndarray:
    pixels = np.full((ROWS, COLUMNS), 1000, dtype=np.uint16)
    if present:
        pixels[BLOCK] = 2000
    return pixels


def write_manifest(folder: Path, images: list[str]) -> Path:
    with (folder / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "label"])
        writer.writeheader()
        writer.writerows({"image": image, "label": ""} for image in images)
    return folder / "manifest.csv"


class ImageEvidence(InterpretableModel):
    """Its localization map is the image, scaled to [0, 1] per sample: evidence exactly where the block is."""

    def __init__(self, spatial_dims: int) -> None:
        super().__init__(spatial_dims, 1, 2)
        self.bias = nn.Parameter(torch.tensor([0.0, 1.0]))  # predicts class 1
        self.model_spec = ModelSpec(name="image_evidence", kwargs={"spatial_dims": spatial_dims})

    def forward(self, image: Tensor, *, explain: bool = True) -> ModelOutput:
        low = image.flatten(1).amin(1).view(-1, *[1] * (image.ndim - 1))
        high = image.flatten(1).amax(1).view(-1, *[1] * (image.ndim - 1))
        scaled = (image - low) / (high - low).clamp_min(1e-8)
        logits = self.bias.expand(image.shape[0], 2)
        return ModelOutput(logits=logits, localization=scaled.expand(-1, 2, *image.shape[2:]) if explain else None)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"all": [self.bias]}


def predict(tmp_path: Path, manifest: Path, spatial_dims: int, spatial_size: list[int], **writer_options) -> Path:
    data = ManifestDataModule(str(manifest), spatial_dims=spatial_dims, spatial_size=spatial_size,
                              class_names=["benign", "malignant"], orientation="RAS" if spatial_dims == 3 else None,
                              batch_size=2)
    out = tmp_path / "explanations"
    module = InterpretableModule(ImageEvidence(spatial_dims), class_names=["benign", "malignant"])
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tmp_path,
                         callbacks=[ExplanationWriter(out, dicom=True, **writer_options)])
    trainer.predict(module, datamodule=data, return_predictions=False)
    return out


def frame_positions(segmentation: hd.seg.Segmentation) -> list[list[float]]:
    return [[float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
            for group in segmentation.PerFrameFunctionalGroupsSequence]


def check_segmentation_references(segmentation: hd.seg.Segmentation, sources: list[Dataset]) -> None:
    """The Segmentation's study, series, instances, Frame of Reference and geometry are its sources'."""
    source = sources[0]
    assert segmentation.StudyInstanceUID == source.StudyInstanceUID
    assert segmentation.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert segmentation.SeriesInstanceUID != source.SeriesInstanceUID
    (series,) = segmentation.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert {item.ReferencedSOPInstanceUID for item in series.ReferencedInstanceSequence} == {
        ds.SOPInstanceUID for ds in sources}
    shared = segmentation.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == list(SPACING)
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert (segmentation.Rows, segmentation.Columns) == (ROWS, COLUMNS)
    by_position = {tuple(float(v) for v in ds.ImagePositionPatient): ds.SOPInstanceUID for ds in sources}
    for group, position in zip(segmentation.PerFrameFunctionalGroupsSequence, frame_positions(segmentation),
                               strict=True):
        referenced = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert referenced == by_position[tuple(position)]  # each frame lies on the image it references


def check_overlay(path: Path, source: Dataset) -> np.ndarray:
    overlay = pydicom.dcmread(path)
    assert overlay.SOPClassUID == SecondaryCaptureImageStorage
    assert overlay.StudyInstanceUID == source.StudyInstanceUID and overlay.PatientID == source.PatientID
    assert overlay.PhotometricInterpretation == "RGB" and overlay.pixel_array.shape == (ROWS, COLUMNS, 3)
    assert overlay.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert [float(v) for v in overlay.PixelSpacing] == list(SPACING)
    assert [float(v) for v in overlay.ImagePositionPatient] == [float(v) for v in source.ImagePositionPatient]
    assert [float(v) for v in overlay.ImageOrientationPatient] == [float(v) for v in source.ImageOrientationPatient]
    assert overlay.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert overlay.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    return overlay.pixel_array.astype(float)


def colourfulness(rgb: np.ndarray) -> np.ndarray:
    return rgb.max(axis=-1) - rgb.min(axis=-1)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_2d_dicom_gets_a_segmentation_and_an_overlay_on_the_source_grid(tmp_path: Path) -> None:
    study, frame = generate_uid(), generate_uid()
    sources = [write_slice(tmp_path / f"case{i}.dcm", block_image(), generate_uid(), study, frame, 0) for i in (0, 1)]
    out = predict(tmp_path, write_manifest(tmp_path, ["case0.dcm", "case1.dcm"]), 2, [16, 16])
    rows = {row["id"]: row for row in read_index(out)}
    truth = np.zeros((ROWS, COLUMNS), dtype=bool)
    truth[BLOCK] = True
    for index, source in enumerate(sources):
        row = rows[f"case{index}"]
        assert row["dicom"].split(";") == [f"case{index}.seg.dcm", f"case{index}.overlay.dcm"]
        segmentation = hd.seg.segread(out / f"case{index}.seg.dcm")
        check_segmentation_references(segmentation, [source])
        assert segmentation.SegmentSequence[0].SegmentLabel == "evidence for malignant"
        assert frame_positions(segmentation) == [[float(v) for v in source.ImagePositionPatient]]
        mask = segmentation.pixel_array.reshape(ROWS, COLUMNS).astype(bool)
        assert dice(mask, truth) > 0.85  # the 16x16 model grid, resampled back onto 24x40 source pixels
        colour = colourfulness(check_overlay(out / f"case{index}.overlay.dcm", source))
        assert colour[BLOCK].mean() > 5 * colour[~truth].mean() + 20  # the map is drawn where the block is


def test_3d_series_gets_one_segmentation_frame_and_one_overlay_per_source_slice(tmp_path: Path) -> None:
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    folder = tmp_path / "series"
    folder.mkdir()
    order = [4, 0, 5, 2, 1, 3]  # file names do not follow slice order
    sources = {number: write_slice(folder / f"img{name}.dcm", block_image(number in BLOCK_SLICES), series, study,
                                   frame, number) for name, number in enumerate(order)}
    ordered = [sources[number] for number in sorted(sources)]
    out = predict(tmp_path, write_manifest(tmp_path, ["series"]), 3, [16, 16, 6])
    (row,) = read_index(out)
    files = row["dicom"].split(";")
    assert files == ["series.seg.dcm", *[f"series.overlay.{k:03d}.dcm" for k in range(6)]]
    segmentation = hd.seg.segread(out / "series.seg.dcm")
    check_segmentation_references(segmentation, ordered)
    volume = segmentation.pixel_array.reshape(-1, ROWS, COLUMNS).astype(bool)
    marked = {round(position[2], 3) for position, frame_mask in zip(frame_positions(segmentation), volume,
                                                                    strict=True) if frame_mask.any()}
    assert marked == {ORIGIN[2] + SLICE_MM * k for k in BLOCK_SLICES}
    for position, frame_mask in zip(frame_positions(segmentation), volume, strict=True):
        if frame_mask.any():
            truth = np.zeros_like(frame_mask)
            truth[BLOCK] = True
            assert dice(frame_mask, truth) > 0.85, position
    for k, source in enumerate(ordered):  # overlays follow the slices along the normal
        colour = colourfulness(check_overlay(out / f"series.overlay.{k:03d}.dcm", source))
        assert (colour[BLOCK].mean() > 20) == (k in BLOCK_SLICES)
    assert {out / name for name in files} <= explanation_files(out, [])  # overwrite removes them with the rest


def test_dicom_output_of_non_dicom_input_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(block_image().astype(np.uint8)).save(tmp_path / "photo.png")
    with pytest.raises(DicomOutputError, match=r"sample 'photo' was read from .*photo.png', which is not DICOM"):
        predict(tmp_path, write_manifest(tmp_path, ["photo.png"]), 2, [16, 16])
    assert not (tmp_path / "explanations" / RUN_FILE).exists()
    module = InterpretableModule(ImageEvidence(2))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ExplanationWriter(tmp_path / "random", dicom=True)], default_root_dir=tmp_path)
    with pytest.raises(DicomOutputError, match=r"prediction data \(_Samples\) name no source files"):
        trainer.predict(module, datamodule=RandomDataModule(spatial_dims=2, num_samples=2), return_predictions=False)
    with pytest.raises(ValueError, match=r"dicom_threshold must be in \[0, 1\]"):
        ExplanationWriter(tmp_path / "x", dicom=True, dicom_threshold=1.5)
    with pytest.raises(ValueError, match=r"dicom_outputs must be a non-empty subset of \['segmentation', 'overlay'\]"):
        ExplanationWriter(tmp_path / "x", dicom=True, dicom_outputs=["nifti"])


def test_the_command_says_in_one_line_that_dicom_output_needs_dicom_input(tmp_path: Path, capsys) -> None:
    from PIL import Image

    Image.fromarray(block_image().astype(np.uint8)).save(tmp_path / "photo.png")
    manifest = write_manifest(tmp_path, ["photo.png"])
    root = Path(__file__).resolve().parents[1]
    with pytest.raises(SystemExit) as stop:
        main(["predict", "--model.model=blackbox", "--data.class_path=pellucid.training.data.ManifestDataModule",
              f"--data.init_args.manifest={manifest}", "--data.init_args.class_names=[a,b]",
              "--data.init_args.spatial_size=[16,16]", "--config", str(root / "configs/predict/explanations.yaml"),
              f"--trainer.callbacks.output_dir={tmp_path / 'out'}", "--trainer.callbacks.dicom=true",
              "--trainer.logger=false", "--trainer.enable_progress_bar=false",
              f"--trainer.default_root_dir={tmp_path}"])
    assert stop.value.code == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("pellucid: error: ExplanationWriter: dicom output needs DICOM input") and "\n" not in error
    assert "--trainer.callbacks.dicom=false" in error
