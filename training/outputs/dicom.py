"""Explanations as DICOM, for the viewers clinicians use (``ExplanationWriter(dicom=True)``).

For every sample read from DICOM (one file, or a folder holding one series), the writer adds, beside its ``.npz``:

- ``<id>.seg.dcm``: a binary DICOM Segmentation (highdicom) of the predicted class's localization map, thresholded:
  a source pixel belongs to the segment where the map, resampled onto the source pixel grid, is at least
  ``threshold`` (default 0.5). Localization maps are scaled per sample and class so that the peak evidence is 1
  (:func:`~pellucid.models.concept_layers.scale_to_unit`), so 0.5 marks where the evidence is at least half its
  peak. One frame per source image, each referencing its source instance; the Segmentation references the source
  series, study and Frame of Reference, and its pixel spacing, image position and orientation are the source's.
- ``<id>.overlay.dcm`` (one source image) or ``<id>.overlay.<k>.dcm`` (slice ``k`` of a series): a colour Secondary
  Capture per source image, the source image in grey with the predicted class's map blended over it in colour
  (opacity 0.6 x the map's value). A Secondary Capture has no image plane of its own; these carry the source's
  Frame of Reference UID, pixel spacing, image position and orientation as extra standard attributes, reference
  their source instance (Source Image Sequence) and series (Referenced Series Sequence), and keep its study.

The maps come from the model's input grid; the batch's ``affine`` (the input's voxel-to-world matrix in MONAI's RAS
convention, which :class:`~pellucid.training.data.ManifestDataModule` sets) and ``source`` (the file or folder a
sample was read from) tie them to the source: each source pixel's centre (DICOM patient coordinates, LPS) is mapped
into the model's grid and the map is interpolated there (linear, 0 outside the model's field of view). So
reorientation, resampling and resizing in the data pipeline do not shift the output.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl

from pellucid.training.data.prediction_data import dataset_records, predict_datasets

DICOM_OUTPUTS: tuple[str, ...] = ("segmentation", "overlay")
OVERLAY_OPACITY = 0.6
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
MANUFACTURER = "pellucid"


class DicomOutputError(ValueError):
    """DICOM output was asked for input that is not DICOM, or the batch lacks what ties a map to its source."""


def is_dicom_file(path: Path) -> bool:
    """Whether ``path`` is a DICOM file (the ``DICM`` preamble)."""
    from pydicom.misc import is_dicom

    return path.is_file() and is_dicom(path)


def is_dicom_source(path: Path) -> bool:
    """Whether ``path`` is a DICOM file or a folder holding DICOM files (a series)."""
    if path.is_dir():
        return any(is_dicom_file(child) for child in path.iterdir())
    return is_dicom_file(path)


def read_source(path: Path) -> list[Any]:
    """The source images of a sample: one dataset, or a series' datasets ordered along the slice normal.

    Raises:
        DicomOutputError: for a multi-frame image, a folder without DICOM images, or images without plane geometry.
    """
    import pydicom

    files = sorted(child for child in path.iterdir() if is_dicom_file(child)) if path.is_dir() else [path]
    datasets = [pydicom.dcmread(file) for file in files]
    datasets = [ds for ds in datasets if "PixelData" in ds]
    if not datasets:
        raise DicomOutputError(f"DICOM output: {path} holds no DICOM image (no pixel data); expected the image or "
                               "series the sample was read from")
    for ds in datasets:
        missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if k not in ds]
        if missing or int(ds.get("NumberOfFrames", 1) or 1) > 1:
            what = f"lacks {missing}" if missing else f"has {ds.NumberOfFrames} frames"
            raise DicomOutputError(f"DICOM output: {ds.filename} {what}; expected single-frame images with plane "
                                   "geometry (image position, orientation, pixel spacing); turn off dicom for this "
                                   "data (--trainer.callbacks.dicom=false)")
    normal = np.cross(*_directions(datasets[0]))
    datasets = [_with_type2_attributes(ds) for ds in datasets]
    return sorted(datasets, key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))


# patient and study attributes every image must have, possibly empty (type 2); some files leave them out
TYPE2_ATTRIBUTES = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "StudyID", "AccessionNumber", "ReferringPhysicianName")


def _with_type2_attributes(ds: Any) -> Any:
    """``ds`` with every missing type 2 patient/study attribute present and empty, as highdicom copies them."""
    for keyword in TYPE2_ATTRIBUTES:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def _directions(ds: Any) -> tuple[np.ndarray, np.ndarray]:
    """(along a row: increasing column index, along a column: increasing row index), unit vectors in LPS."""
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    return orientation[:3], orientation[3:]


def source_points(ds: Any) -> np.ndarray:
    """(Rows, Columns, 3) patient coordinates (LPS, mm) of every pixel centre of one image."""
    along_row, along_column = _directions(ds)
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    rows, columns = np.meshgrid(np.arange(int(ds.Rows)), np.arange(int(ds.Columns)), indexing="ij")
    return (np.asarray(ds.ImagePositionPatient, np.float64) + columns[..., None] * column_spacing * along_row
            + rows[..., None] * row_spacing * along_column)


def resample_to_source(values: np.ndarray, affine: np.ndarray, datasets: Sequence[Any]) -> np.ndarray:
    """A map on the model's input grid, interpolated at every source pixel: (frames, Rows, Columns).

    Args:
        values: (*S) map on the model's grid (2 or 3 spatial axes).
        affine: (4, 4) voxel-to-world matrix of that grid (RAS, MONAI's convention).
        datasets: The source images (:func:`read_source`).
    """
    from scipy.ndimage import map_coordinates

    inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    frames = []
    for ds in datasets:
        ras = source_points(ds) @ LPS_TO_RAS.T
        voxel = ras @ inverse[:3, :3].T + inverse[:3, 3]  # (R, C, 3) model-grid coordinates
        coordinates = np.moveaxis(voxel[..., : values.ndim], -1, 0)
        frames.append(map_coordinates(values.astype(np.float64), coordinates, order=1, mode="constant", cval=0.0))
    return np.stack(frames)


def _grey(ds: Any) -> np.ndarray:
    """The source image as (Rows, Columns, 3) floats in [0, 1]: its window if it has one, else its 1-99% range."""
    pixels = ds.pixel_array.astype(np.float64)
    if pixels.ndim == 3:  # colour source: keep its colours
        return np.clip(pixels / max(float(pixels.max()), 1.0), 0.0, 1.0)
    pixels = pixels * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        center = float(center[0] if isinstance(center, Sequence) else center)
        width = float(width[0] if isinstance(width, Sequence) else width)
        low, high = center - width / 2, center + width / 2
    else:
        low, high = np.percentile(pixels, [1, 99])
    grey = np.clip((pixels - low) / max(high - low, 1e-6), 0.0, 1.0)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        grey = 1.0 - grey
    return np.repeat(grey[..., None], 3, axis=2)


def overlay_pixels(ds: Any, heat: np.ndarray) -> np.ndarray:
    """(Rows, Columns, 3) uint8: the source image in grey, ``heat`` (in [0, 1]) blended over it in colour."""
    from matplotlib import colormaps

    colour = colormaps["turbo"](np.clip(heat, 0.0, 1.0))[..., :3]
    alpha = (OVERLAY_OPACITY * np.clip(heat, 0.0, 1.0))[..., None]
    return np.round(255 * ((1 - alpha) * _grey(ds) + alpha * colour)).astype(np.uint8)


def _orientation_letter(vector: np.ndarray) -> str:
    axis = int(np.argmax(np.abs(vector)))
    return ("L", "P", "H")[axis] if vector[axis] > 0 else ("R", "A", "F")[axis]


def _reference(ds: Any) -> Any:
    from pydicom.dataset import Dataset

    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    return item


class DicomExport:
    """Write each sample's explanation as DICOM (see the module docstring).

    Args:
        threshold: Segmentation threshold on the localization map, in [0, 1] (the map's peak is 1).
        outputs: Which objects to write: ``"segmentation"`` and/or ``"overlay"``.
    """

    def __init__(self, threshold: float = 0.5, outputs: Sequence[str] = DICOM_OUTPUTS) -> None:
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"ExplanationWriter: dicom_threshold must be in [0, 1] (maps peak at 1), got {threshold}")
        unknown = [name for name in outputs if name not in DICOM_OUTPUTS]
        if unknown or not outputs:
            raise ValueError(f"ExplanationWriter: dicom_outputs must be a non-empty subset of {list(DICOM_OUTPUTS)}, "
                             f"got {list(outputs)}")
        self.threshold, self.outputs = float(threshold), tuple(outputs)

    def check_inputs(self, trainer: pl.Trainer) -> None:
        """Before anything is written: every prediction sample must come from a DICOM file or series.

        Raises:
            DicomOutputError: naming the first sample that does not (or the dataset that names no source files).
        """
        for dataset in predict_datasets(trainer):
            records = dataset_records(dataset)
            if records is None:
                raise DicomOutputError(
                    f"ExplanationWriter: dicom output needs DICOM input, but the prediction data "
                    f"({type(dataset).__name__}) name no source files; fix: predict DICOM files listed in a "
                    "manifest (ManifestDataModule), or turn off dicom (--trainer.callbacks.dicom=false)")
            for record in records:
                self._check_source(record.get("id"), record.get("source", record.get("image")))

    def _check_source(self, sample_id: Any, source: Any) -> Path:
        path = Path(str(source)) if isinstance(source, str | Path) else None
        if path is None or not is_dicom_source(path):
            raise DicomOutputError(
                f"ExplanationWriter: dicom output needs DICOM input, but sample {sample_id!r} was read from "
                f"{str(source)!r}, which is not DICOM; fix: predict DICOM files or series only, or turn off dicom "
                "(--trainer.callbacks.dicom=false)")
        return path

    def write(self, folder: Path, name: str, batch: Mapping[str, Any], index: int, localization: np.ndarray,
              class_name: str, about: Mapping[str, Any], write: Callable[[Path, bytes], None]) -> list[str]:
        """Write one sample's DICOM objects; return their file names.

        Args:
            folder: The explanation folder.
            name: The sample's file stem.
            batch: The batch (``source``, ``affine`` and ``id`` are read).
            index: The sample's position in the batch.
            localization: (*S) the predicted class's map on the model's input grid, in [0, 1].
            class_name: The predicted class.
            about: ``model`` and ``weights_sha256`` (recorded as the device that made the objects).
            write: Writes bytes to a path atomically.

        Raises:
            DicomOutputError: when the batch lacks ``source`` or ``affine``, or the source is not DICOM.
        """
        sample_id = batch["id"][index]
        for key in ("source", "affine"):
            if key not in batch:
                raise DicomOutputError(f"ExplanationWriter: dicom output needs batch[{key!r}] to tie sample "
                                       f"{sample_id!r}'s map to its DICOM source; fix: read DICOM input through "
                                       "ManifestDataModule, or turn off dicom (--trainer.callbacks.dicom=false)")
        datasets = read_source(self._check_source(sample_id, batch["source"][index]))
        affine = np.asarray(batch["affine"][index].detach().cpu().double().numpy())
        heat = resample_to_source(localization, affine, datasets)
        files = []
        if "segmentation" in self.outputs:
            segmentation = self._segmentation(datasets, heat >= self.threshold, class_name, about)
            files.append(self._save(folder, f"{name}.seg.dcm", segmentation, write))
        if "overlay" in self.outputs:
            series = _uid()
            for number, (ds, frame) in enumerate(zip(datasets, heat, strict=True)):
                suffix = "overlay" if len(datasets) == 1 else f"overlay.{number:03d}"
                image = self._overlay(ds, frame, series, number + 1, class_name, about)
                files.append(self._save(folder, f"{name}.{suffix}.dcm", image, write))
        return files

    @staticmethod
    def _save(folder: Path, file_name: str, dataset: Any, write: Callable[[Path, bytes], None]) -> str:
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        write(folder / file_name, buffer.getvalue())
        return file_name

    def _segmentation(self, datasets: Sequence[Any], mask: np.ndarray, class_name: str,
                      about: Mapping[str, Any]) -> Any:
        import highdicom as hd
        from pydicom.sr.codedict import codes

        algorithm = hd.AlgorithmIdentificationSequence(name=f"pellucid {about.get('model') or 'model'}",
                                                       family=codes.cid7162.ArtificialIntelligence,
                                                       version=_version(),
                                                       parameters={"threshold": f"{self.threshold:g}"})
        segment = hd.seg.SegmentDescription(
            segment_number=1, segment_label=f"evidence for {class_name}"[:64],
            segmented_property_category=codes.SCT.SpatialAndRelationalConcept,
            segmented_property_type=hd.sr.CodedConcept("EVIDENCE", "99PELLUCID", "Model evidence region"),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
        return hd.seg.Segmentation(
            source_images=list(datasets), pixel_array=mask.astype(np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[segment],
            series_instance_uid=_uid(), series_number=9001, sop_instance_uid=_uid(), instance_number=1,
            manufacturer=MANUFACTURER, manufacturer_model_name=str(about.get("model") or "model")[:64],
            software_versions=_version(), device_serial_number=str(about.get("weights_sha256") or "unknown")[:16],
            content_label="EVIDENCE", content_description=f"localization >= {self.threshold:g} for {class_name}"[:64],
            omit_empty_frames=False,
            series_description=f"pellucid evidence for {class_name}"[:64])

    def _overlay(self, ds: Any, heat: np.ndarray, series: str, number: int, class_name: str,
                 about: Mapping[str, Any]) -> Any:
        import highdicom as hd
        from pydicom.dataset import Dataset

        along_row, along_column = _directions(ds)
        image = hd.sc.SCImage.from_ref_dataset(
            ds, overlay_pixels(ds, heat), photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system="PATIENT", series_instance_uid=series, series_number=9002, sop_instance_uid=_uid(),
            instance_number=number, manufacturer=MANUFACTURER,
            pixel_spacing=tuple(float(v) for v in ds.PixelSpacing),
            patient_orientation=(_orientation_letter(along_row), _orientation_letter(along_column)),
            transfer_syntax_uid="1.2.840.10008.1.2.1")
        image.SeriesDescription = f"pellucid overlay: evidence for {class_name}"[:64]
        image.ImageType = ["DERIVED", "SECONDARY"]
        image.DerivationDescription = (f"localization map of {about.get('model') or 'the model'} for {class_name}, "
                                       "blended over the source image")[:1024]
        image.ManufacturerModelName = str(about.get("model") or "model")[:64]
        image.SourceImageSequence = [_reference(ds)]
        series_reference = Dataset()
        series_reference.SeriesInstanceUID = ds.SeriesInstanceUID
        series_reference.ReferencedInstanceSequence = [_reference(ds)]
        image.ReferencedSeriesSequence = [series_reference]
        for keyword in ("FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient", "SliceThickness",
                        "SliceLocation", "PositionReferenceIndicator"):
            if keyword in ds:
                setattr(image, keyword, ds.data_element(keyword).value)
        return image


def _uid() -> str:
    from pydicom.uid import generate_uid

    return generate_uid()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"pellucid {version('pellucid')}"
    except PackageNotFoundError:
        return "pellucid (source checkout)"
