"""``ManifestDataModule``: train on your own images listed in a CSV or JSON manifest.

Images are read with MONAI's ``LoadImage`` (PNG/JPEG through PIL, NIfTI through nibabel, DICOM files and
DICOM series folders through pydicom), then optionally reoriented (3D), resampled to a spacing, intensity-scaled
and resized with MONAI transforms. The whole manifest is checked before training (``setup`` or an explicit
``validate()``); one :class:`ManifestError` names every bad row with its number, id and reason.

Example manifest (CSV)::

    image,label,mask,patient,diameter_mm
    scans/p1_a.nii.gz,malignant,masks/p1_a.nii.gz,p1,14.5
    scans/p2_a.nii.gz,benign,,p2,

Samples also carry ``affine`` (4, 4): the voxel-to-world matrix of the image as it enters the model (after
reorientation, resampling and resizing; 2D images use its first two axes), so explanations can be written as NIfTI
aligned with the scan, and ``source``: the file or series folder the image was read from (DICOM output refers to it).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Literal

import torch
from monai.data import Dataset
from monai.transforms import (
    Compose,
    EnsureTyped,
    Lambda,
    Lambdad,
    LoadImage,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    Resized,
    ScaleIntensityd,
    ScaleIntensityRanged,
    Spacingd,
)
from torch.utils.data import DataLoader

from pellucid.models.concepts import ConceptSpec, as_concept_spec
from pellucid.training.data.augment import BatchAugmentation, square_planes
from pellucid.training.data.base import PellucidDataModule, loader_order
from pellucid.training.data.manifest_rows import (
    SPLIT_NAMES,
    ManifestError,
    ManifestRow,
    check_options,
    missing_columns,
    parse_rows,
    patient_level_split,
    patients_in_two_splits,
    read_table,
    single_sample_classes,
)

Intensity = Literal["minmax", "zscore", "none"]


def binarise(mask: torch.Tensor) -> torch.Tensor:
    """Masks become 0/1 (PNG masks often store 255 for "inside")."""
    return (mask > 0).to(torch.float32)


def copy_affine(data: dict[str, Any]) -> dict[str, Any]:
    """Add ``affine``: the (4, 4) float64 voxel-to-world matrix MONAI tracked through the transforms so far."""
    data["affine"] = torch.as_tensor(data["image"].affine, dtype=torch.float64).clone()
    return data


def rgb_to_grey(image: torch.Tensor) -> torch.Tensor:
    """Average the channels of a (3, *S) RGB image into (1, *S); other images pass through."""
    return image.mean(dim=0, keepdim=True) if image.shape[0] == 3 else image


def is_nifti(path: Path) -> bool:
    """Whether ``path`` names a NIfTI file (``.nii`` or ``.nii.gz``)."""
    return path.name.lower().endswith((".nii", ".nii.gz"))


def unreadable(what: str, path: Path, error: Exception) -> str:
    """The reason for a file no reader could open; a DICOM without pixel data (e.g. RT-structure) is named so."""
    modality = dicom_without_pixels(path)
    if modality is not None:
        return (f"{what} {str(path)!r} is a DICOM file with no image (no pixel data; modality {modality!r}, e.g. "
                "an RT-structure or report); list the image series instead")
    return f"unreadable {what} {str(path)!r}: {type(error).__name__}: {error}"


def dicom_without_pixels(path: Path) -> str | None:
    """The modality of a DICOM file that holds no pixel data, else ``None``."""
    if not path.is_file():
        return None
    try:
        import pydicom

        dataset = pydicom.dcmread(path, force=True, stop_before_pixels=False)
    except Exception:  # noqa: BLE001 - not DICOM at all: the caller reports the reader's own error
        return None
    if "PixelData" in dataset or "SOPClassUID" not in dataset:  # force=True parses any bytes: require a DICOM object
        return None
    return str(dataset.get("Modality", "unknown"))


def non_finite(what: str, path: Path, array: torch.Tensor) -> list[str]:
    """A reason when ``array`` holds NaN or infinite values (they poison every batch they enter)."""
    if not torch.is_floating_point(array):
        return []
    bad = int((~torch.isfinite(torch.as_tensor(array))).sum())
    if not bad:
        return []
    return [f"{what} {path.name!r} has {bad} NaN/inf voxel(s) of {array.numel()}, expected finite values; replace "
            "them (numpy.nan_to_num) or leave the row out"]


def unequal_sizes(rows: list[ManifestRow], shapes: dict[int, tuple[int, ...]],
                  spacing_mm: list[float] | None) -> list[tuple[int, str, str]]:
    """Without ``spatial_size``, every image must arrive with one size, or batches cannot stack."""
    sizes = Counter(shapes[row.number] for row in rows if row.number in shapes)
    if len(sizes) < 2:
        return []
    common = sizes.most_common(1)[0][0]
    after = " after resampling to spacing_mm" if spacing_mm else ""
    return [(row.number, row.sample_id, f"image size {shapes[row.number]}{after} differs from the most common "
             f"{common} (sizes in the manifest: {dict(sizes)}); batches need one size: set spatial_size, e.g. "
             f"spatial_size: {list(common)}") for row in rows if shapes.get(row.number, common) != common]


class ManifestDataModule(PellucidDataModule):
    """A user's images, labels, masks and concepts from a manifest, split by patient.

    Args:
        manifest: Path of the CSV or JSON manifest.
        spatial_dims: 2 or 3; every image must have this many spatial axes.
        image_column: Column with the image path (relative paths are resolved against ``root``).
        label_columns: One column (class name or index per row) or several 0/1 columns (multi-label).
        class_names: Class names of a single label column, in index order; default: the sorted distinct values.
        mask_column: Optional column with a mask path (same spatial shape as the image).
        concepts: Concept columns with their kind and unit (``{name, kind, unit, group}``); blank cells = NaN.
        patient_column: Optional patient id; no patient ends up in two splits.
        id_column: Optional sample id column (default: the image file name without suffix).
        split_column: Optional explicit split per row (``train``/``val``/``test``/``predict``).
        val_fraction: Share of patients (or rows) for validation when no split is given.
        test_fraction: Share of patients (or rows) for testing when no split is given.
        seed: Seed of the split.
        in_channels: Channels the model gets; RGB images become grey when 1.
        spacing_mm: Resample to this spacing (one value per axis) with ``Spacingd``.
        orientation: Reorient 3D images to these axis codes (e.g. ``"RAS"``).
        spatial_size: Resize every image (and mask) to this size, so batches stack.
        intensity: ``"minmax"`` (scale each image to [0, 1]), ``"zscore"`` or ``"none"``.
        intensity_range: ``[a_min, a_max]`` window mapped to [0, 1] and clipped (e.g. CT in HU); overrides
            ``intensity``.
        batch_size: Samples per batch.
        num_workers: Data loader workers.
        root: Folder relative paths are resolved against (default: the manifest's folder).
        augment: Flip training batches at random along every spatial axis and, where ``spatial_size`` (and
            ``spacing_mm``) make two axes alike, turn them by random quarter turns (without ``spacing_mm``, only in
            the plane of the first two axes); see :class:`~pellucid.training.data.augment.BatchAugmentation`. Off
            by default: a flip swaps left and right, which changes the meaning of lateralised findings.
    """

    def __init__(
        self,
        manifest: str,
        spatial_dims: int = 2,
        image_column: str = "image",
        label_columns: str | list[str] = "label",
        class_names: list[str] | None = None,
        mask_column: str | None = None,
        concepts: list[ConceptSpec] | None = None,
        patient_column: str | None = None,
        id_column: str | None = None,
        split_column: str | None = None,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        in_channels: int = 1,
        spacing_mm: list[float] | None = None,
        orientation: str | None = None,
        spatial_size: list[int] | None = None,
        intensity: Intensity = "minmax",
        intensity_range: list[float] | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        root: str | None = None,
        augment: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(f"val_fraction and test_fraction must be in [0, 1) with a sum below 1, got "
                             f"{val_fraction} and {test_fraction}")
        self.manifest = Path(manifest)
        check_options(self.manifest, spatial_dims, spacing_mm, spatial_size, intensity_range)
        # class names and concepts reach the model's hparams through the CLI link; logging them twice, with the
        # data's raw and the model's resolved values, would make Lightning refuse to merge the two
        self.save_hyperparameters(ignore=["class_names", "concepts"])
        self.root = Path(root) if root is not None else self.manifest.parent
        self.table = read_table(self.manifest)
        self.label_columns = [label_columns] if isinstance(label_columns, str) else list(label_columns)
        self.classes_declared = bool(class_names) or len(self.label_columns) > 1
        self.spatial_dims, self.in_channels = spatial_dims, in_channels
        self.concept_specs = [as_concept_spec(c) for c in concepts or []]
        if len(self.label_columns) > 1:
            self.task = "multilabel"
            self.class_names = list(self.label_columns)
        else:
            self.task = "multiclass"
            self.class_names = list(class_names) if class_names else self._distinct_labels()
            if not self.class_names:
                raise ManifestError.whole(self.manifest, f"no labels: column {self.label_columns[0]!r} (label_columns) "
                                                         f"is blank or missing in all {len(self.table)} rows; fill it "
                                                         "with each image's class, or give class_names")
        self.num_classes = len(self.class_names)
        self.rows: list[ManifestRow] | None = None
        self.splits: dict[str, list[int]] = {}
        planes = square_planes(spatial_size, spacing_mm) if spatial_size is not None else []
        if spacing_mm is None:  # unknown voxel size: turn only in the first plane (in-plane for axial volumes)
            planes = [plane for plane in planes if plane == (0, 1)]
        self.augmentation = BatchAugmentation(spatial_dims, planes, seed=seed) if augment else None

    def _distinct_labels(self) -> list[str]:
        column = self.label_columns[0]
        values = {str(r.get(column)).strip() for r in self.table if str(r.get(column, "")).strip() not in ("", "None")}
        if values and all(v.lstrip("-").isdigit() for v in values):
            return [str(i) for i in range(max(int(v) for v in values) + 1)]
        return sorted(values)

    # ------------------------------------------------------------------------------------------ checks
    def validate(self, predicting: bool = False) -> list[ManifestRow]:
        """Check every row: files, ids, labels, concepts, image readability and values, dimensionality, channels.

        Masks must match their image's shape and have one channel; without ``spatial_size`` all images must arrive
        with one size.

        Args:
            predicting: For ``predict`` (``setup("predict")``): rows without a label (and without a split) become
                ``predict`` rows instead of errors.

        Raises:
            ManifestError: listing every bad row with its number, id and reason.
        """
        hp = self.hparams
        columns = {"image_column": hp.image_column, "mask_column": hp.mask_column,
                   "patient_column": hp.patient_column, "split_column": hp.split_column}
        if self.task == "multilabel":
            columns.update({f"label_columns[{i}]": c for i, c in enumerate(self.label_columns)})
        absent = missing_columns(self.table, columns)
        if absent:
            raise ManifestError(self.manifest, absent)
        rows, problems = parse_rows(self.table, self.root, hp.image_column, self.label_columns,
                                    self.class_names if self.task == "multiclass" else None, hp.mask_column,
                                    self.concept_specs, hp.patient_column, hp.id_column, hp.split_column)
        problems += patients_in_two_splits(rows)
        for row in rows if predicting else []:  # `predict` needs no labels: its unlabelled rows are the ones to predict
            row.split = "predict" if row.label is None and row.split is None else row.split
        if not self.classes_declared and any(row.split != "predict" for row in rows if row.label is not None):
            problems += single_sample_classes(rows, self.class_names, self.label_columns[0])
        reader = LoadImage(image_only=True, ensure_channel_first=True)
        good, shapes = [], {}
        for row in rows:
            reasons = self._check_images(row, reader, shapes)
            if self.hparams.mask_column and row.mask is None:
                reasons.append(f"column {self.hparams.mask_column!r} (mask) is empty; every row needs a mask when "
                               "mask_column is set")
            if row.label is None and row.split != "predict":
                reasons.append(f"missing label in column {self.label_columns[0]!r} (only 'predict' rows may lack one)")
            problems.extend((row.number, row.sample_id, reason) for reason in reasons)
            if not reasons:
                good.append(row)
        if not hp.spatial_size:
            problems += unequal_sizes(good, shapes, hp.spacing_mm)
        if problems:
            raise ManifestError(self.manifest, sorted(problems))
        self.rows = good
        return good

    def _check_images(self, row: ManifestRow, reader: LoadImage, shapes: dict[int, tuple[int, ...]]) -> list[str]:
        try:
            image = reader(str(row.image))
        except Exception as error:  # noqa: BLE001 - any reader failure is a bad row, reported with its cause
            return [unreadable("image", row.image, error)]
        name = row.image.name
        spatial = tuple(image.shape[1:])
        reasons = []
        if len(spatial) != self.spatial_dims:
            reasons.append(f"wrong dimensionality: expected {self.spatial_dims} spatial axes, got image shape "
                           f"{tuple(image.shape)} (channels first) from {name}")
        reasons += self._channel_problems(row.image, tuple(image.shape))
        reasons += non_finite("image", row.image, image)
        if row.mask is not None:
            try:
                mask = reader(str(row.mask))
            except Exception as error:  # noqa: BLE001 - reported as a bad row
                return [*reasons, unreadable("mask", row.mask, error)]
            if mask.shape[0] != 1:
                reasons.append(f"mask {row.mask.name!r} has {mask.shape[0]} channels (shape {tuple(mask.shape)}, "
                               "channels first), expected 1; save the mask as a one-channel (greyscale) image, 0 "
                               "outside and > 0 inside")
            if tuple(mask.shape[1:]) != spatial:
                reasons.append(f"mask shape differs from image: mask {tuple(mask.shape[1:])}, image {spatial}")
            reasons += non_finite("mask", row.mask, mask)
        pixdim = [float(v) for v in image.pixdim][: len(spatial)] if hasattr(image, "pixdim") else [1.0] * len(spatial)
        shapes[row.number] = spatial if not self.hparams.spacing_mm else tuple(
            round(n * d / s) for n, d, s in zip(spatial, pixdim, self.hparams.spacing_mm, strict=False))
        return reasons

    def _channel_problems(self, path: Path, shape: tuple[int, ...]) -> list[str]:
        """RGB (3 channels) is averaged to grey only for 2D non-NIfTI images; a 4D NIfTI's volumes are not RGB."""
        channels = shape[0]
        if channels == self.in_channels:
            return []
        if channels == 3 and self.in_channels == 1 and self.spatial_dims == 2 and not is_nifti(path):
            return []
        if is_nifti(path) or self.spatial_dims == 3:
            return [f"image {path.name!r} holds {channels} volumes along its last axis (shape {shape}, channels "
                    f"first): a time series or multi-echo scan, expected {self.in_channels} channel(s); keep one "
                    f"volume (nibabel: image.slicer[..., 0]) or set in_channels={channels} to use them as channels"]
        return [f"image {path.name!r} has {channels} channels (shape {shape}, channels first), expected "
                f"{self.in_channels} (or RGB when in_channels is 1); convert it or set in_channels={channels}"]

    # ------------------------------------------------------------------------------------- datasets
    def transforms(self) -> Compose:
        """The MONAI loading and preprocessing pipeline (image and, when present, mask)."""
        hp = self.hparams
        keys = ["image", "mask"] if hp.mask_column else ["image"]
        image_mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
        steps: list[Any] = [LoadImaged(keys, ensure_channel_first=True, image_only=True)]
        if self.in_channels == 1:
            steps.append(Lambdad("image", rgb_to_grey))
        if hp.orientation and self.spatial_dims == 3:
            steps.append(Orientationd(keys, axcodes=hp.orientation))
        if hp.spacing_mm:
            steps.append(Spacingd(keys, pixdim=hp.spacing_mm, mode=["bilinear", "nearest"][: len(keys)]))
        if hp.intensity_range:
            low, high = hp.intensity_range
            steps.append(ScaleIntensityRanged("image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True))
        elif hp.intensity == "minmax":
            steps.append(ScaleIntensityd("image", minv=0.0, maxv=1.0))
        elif hp.intensity == "zscore":
            steps.append(NormalizeIntensityd("image"))
        if hp.spatial_size:
            steps.append(Resized(keys, spatial_size=hp.spatial_size, mode=[image_mode, "nearest"][: len(keys)]))
        if hp.mask_column:
            steps.append(Lambdad("mask", binarise))
        steps.append(Lambda(copy_affine))  # before EnsureTyped drops the metadata
        steps.append(EnsureTyped(keys, dtype=torch.float32, track_meta=False))
        return Compose(steps)

    def _record(self, row: ManifestRow) -> dict[str, Any]:
        record: dict[str, Any] = {"image": str(row.image), "id": row.sample_id, "source": str(row.image)}
        if self.task == "multilabel":
            record["label"] = torch.tensor(row.label, dtype=torch.float32)
        else:
            record["label"] = torch.tensor(-1 if row.label is None else row.label, dtype=torch.long)
        if self.hparams.mask_column:
            record["mask"] = str(row.mask)
        if self.concept_specs:
            record["concepts"] = torch.tensor(row.concepts, dtype=torch.float32)
        return record

    def setup(self, stage: str | None = None) -> None:
        """Validate the manifest once and split it by patient."""
        if self.rows is None:
            self.validate(predicting=stage == "predict")
        if not self.splits:
            fractions = {"val": self.hparams.val_fraction, "test": self.hparams.test_fraction}
            self.splits = patient_level_split(self.rows, fractions, self.hparams.seed)

    def dataset(self, split: str) -> Dataset:
        """The MONAI dataset of one split."""
        if split not in SPLIT_NAMES:
            raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
        self.setup()
        records = [self._record(self.rows[i]) for i in self.splits[split]]
        return Dataset(records, transform=self.transforms())

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        dataset = self.dataset(split)  # shuffled per (seed, epoch): a resumed fit replays the same order
        return DataLoader(dataset, batch_size=self.hparams.batch_size,
                          **loader_order(dataset, shuffle, self.hparams.seed), num_workers=self.hparams.num_workers,
                          persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        """Training batches (shuffled with ``seed``)."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in manifest order."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in manifest order."""
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Prediction batches: rows marked ``predict``, else the test split."""
        self.setup()
        return self._loader("predict" if self.splits["predict"] else "test", shuffle=False)
