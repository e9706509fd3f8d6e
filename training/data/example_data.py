"""A small folder of real medical images and a manifest, built from files that installed packages ship.

Used by the README walk-through "train on your own data" and by the tests of :class:`ManifestDataModule`.
Nothing is downloaded. Sources and licences:

- ``CT_small.dcm``: a 128x128 CT slice (NEMA WG04 sample data, downsized), shipped by pydicom (MIT licence).
- ``anatomical.nii``: a 33x41x25 MR volume, shipped with nibabel's test data (MIT licence).
- ``retina.jpg``: a fundus photograph (Häggström, CC0 1.0), and ``microaneurysms.png``: a fundus detail from the
  HRF database (CC0, A. Maier), both shipped by scikit-image (BSD-3 licence for the package).

The 2D example is a modality task (``ct`` versus ``fundus``): each source image and a few flipped/cropped variants,
saved in the source's own format (DICOM stays DICOM), with a threshold mask and one continuous concept,
``bright_fraction`` (share of pixels above the image's mean, in %). The 3D example (``mr`` versus ``ct``) uses
NIfTI volumes and DICOM series folders (slices of the CT image stacked with positions), without masks. Patients
group variants.

    python -m pellucid.training.data.example_data --out examples/own_data --spatial-dims 2
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import numpy as np


def _sources() -> dict[str, Path]:
    import nibabel
    import skimage
    from pydicom.data import get_testdata_file

    skimage_data = Path(skimage.__file__).parent / "data"
    return {
        "ct": Path(get_testdata_file("CT_small.dcm")),
        "mr": Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii",
        "retina": skimage_data / "retina.jpg",
        "microaneurysms": skimage_data / "microaneurysms.png",
    }


def _variants(array: np.ndarray, count: int) -> list[np.ndarray]:
    """The array, its flips and a central crop: deterministic stand-ins for more patients' images."""
    out = [array, np.flip(array, axis=0), np.flip(array, axis=1)]
    trim = tuple(slice(s // 8, s - s // 8) for s in array.shape[:2])
    out.append(array[trim])
    return [np.ascontiguousarray(a) for a in out[:count]]


def _mask_and_concept(array: np.ndarray) -> tuple[np.ndarray, float]:
    grey = array.mean(axis=-1) if array.ndim == 3 and array.shape[-1] == 3 else array
    mask = (grey > grey.mean()).astype(np.uint8)
    return mask, round(100.0 * float(mask.mean()), 2)


def _write_dicom(template: Path, pixels: np.ndarray, path: Path, position_mm: float = 0.0,
                 instance: int = 1, series_uid: str | None = None) -> None:
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(template)
    ds.PixelData = pixels.astype(ds.pixel_array.dtype).tobytes()
    ds.Rows, ds.Columns = pixels.shape
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [0.0, 0.0, float(position_mm)]
    ds.SOPInstanceUID = generate_uid()
    if series_uid is not None:
        ds.SeriesInstanceUID = series_uid
    ds.save_as(path)


def write_example_2d(out: Path) -> Path:
    """Write the 2D example (DICOM, PNG, JPEG + PNG masks) and its manifest; return the manifest path."""
    import pydicom
    from PIL import Image

    src = _sources()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    ct = pydicom.dcmread(src["ct"]).pixel_array
    for index, pixels in enumerate(_variants(ct, 4)):
        name = f"ct_{index}.dcm"
        _write_dicom(src["ct"], pixels, out / name, instance=index + 1)
        mask, bright = _mask_and_concept(pixels.astype(np.float32))
        Image.fromarray(mask * 255).save(out / f"ct_{index}_mask.png")
        rows.append({"image": name, "label": "ct", "mask": f"ct_{index}_mask.png", "patient": f"ct-p{index // 2}",
                     "bright_fraction": bright})
    for source in ("retina", "microaneurysms"):
        pixels = np.asarray(Image.open(src[source]))
        if source == "retina":  # keep the example light: 1411 px is far more than the models need
            pixels = np.asarray(Image.fromarray(pixels).resize((256, 256)))
        suffix = ".jpg" if source == "retina" else ".png"
        for index, variant in enumerate(_variants(pixels, 3)):
            name = f"{source}_{index}{suffix}"
            Image.fromarray(variant).save(out / name)
            mask, bright = _mask_and_concept(variant.astype(np.float32))
            Image.fromarray(mask * 255).save(out / f"{source}_{index}_mask.png")
            rows.append({"image": name, "label": "fundus", "mask": f"{source}_{index}_mask.png",
                         "patient": f"{source}-p{index // 2}", "bright_fraction": bright})
    return _write_manifest(out, rows)


def write_example_3d(out: Path) -> Path:
    """Write the 3D example (NIfTI volumes, DICOM series folders) and its manifest."""
    import nibabel
    import pydicom
    from pydicom.uid import generate_uid

    src = _sources()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    mr = nibabel.load(src["mr"])
    volume = np.asarray(mr.dataobj, dtype=np.float32)
    for index, variant in enumerate(_variants(volume, 4)):
        name = f"mr_{index}.nii.gz"
        nibabel.save(nibabel.Nifti1Image(variant, mr.affine), out / name)
        rows.append({"image": name, "label": "mr", "patient": f"mr-p{index // 2}",
                     "bright_fraction": _mask_and_concept(variant)[1]})
    ct = pydicom.dcmread(src["ct"]).pixel_array
    for index, variant in enumerate(_variants(ct, 4)):
        folder = out / f"ct_series_{index}"
        folder.mkdir(exist_ok=True)
        series = generate_uid()
        slices = [np.roll(variant, shift, axis=0) for shift in range(0, 16, 2)]  # 8 slices, 2.5 mm apart
        for number, pixels in enumerate(slices):
            _write_dicom(src["ct"], pixels, folder / f"slice_{number:02d}.dcm", position_mm=2.5 * number,
                         instance=number + 1, series_uid=series)
        stack = np.stack(slices).astype(np.float32)
        rows.append({"image": folder.name, "label": "ct", "patient": f"ct-p{index // 2}",
                     "bright_fraction": _mask_and_concept(stack)[1]})
    return _write_manifest(out, rows)


def _write_manifest(out: Path, rows: list[dict[str, object]]) -> Path:
    path = out / "manifest.csv"
    partial = path.with_suffix(".csv.partial")
    with partial.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(partial, path)  # a reader never sees half a manifest
    return path


def main(argv: list[str] | None = None) -> None:
    """Command line: write the example folder and print the manifest path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write (created if missing)")
    parser.add_argument("--spatial-dims", type=int, choices=(2, 3), default=2)
    args = parser.parse_args(argv)
    writer = write_example_2d if args.spatial_dims == 2 else write_example_3d
    print(writer(args.out))


if __name__ == "__main__":
    main()
