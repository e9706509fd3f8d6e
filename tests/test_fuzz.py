"""Property-based tests: the validators raise only their declared errors, whatever they are given."""

from __future__ import annotations

import csv
import string
from datetime import timedelta
from pathlib import Path

import nibabel
import numpy as np
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from pellucid.models import ModelOutput, OutputContractError, validate_output
from pellucid.training.data import ManifestDataModule, ManifestError

shapes = st.lists(st.integers(min_value=0, max_value=4), min_size=0, max_size=5)
fills = st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0, float("nan"), float("inf")])


@st.composite
def tensors(draw) -> torch.Tensor:
    shape = draw(shapes)
    return torch.full(shape, draw(fills)) if draw(st.booleans()) else torch.zeros(shape, dtype=torch.long)


@st.composite
def outputs(draw) -> ModelOutput:
    names = ["logits", "segmentation", "localization", "prototype_similarity", "prototype_maps", "concept_logits",
             "concept_maps"]
    values = {name: draw(tensors()) for name in names if draw(st.booleans())}
    if draw(st.booleans()):
        values["attention"] = tuple(draw(st.lists(tensors(), max_size=3)))
    if draw(st.booleans()):
        values["ids"] = draw(st.lists(st.text(max_size=3), max_size=4))
    return ModelOutput(**values)


@settings(max_examples=300, deadline=None)
@given(output=outputs(), image=tensors(), num_classes=st.one_of(st.none(), st.integers(0, 4)))
def test_output_validator_raises_only_its_declared_error(output, image, num_classes) -> None:
    try:
        validate_output(output, image, num_classes=num_classes)
    except OutputContractError:
        pass


cells = st.one_of(st.text(alphabet=string.printable, max_size=12), st.sampled_from(["", "nan", "1", "0", "ct", "-3"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.fixed_dictionaries({"image": cells, "label": cells, "mask": cells, "patient": cells,
                                            "split": cells, "size_mm": cells}), min_size=1, max_size=6))
@example(rows=[{"image": "", "label": label, "mask": "", "patient": "", "split": "", "size_mm": ""}
               for label in ("INFINITY", "-inf", "nan", "1e400")])  # float() accepts them; int() overflowed
def test_manifest_validator_raises_only_manifest_error(rows, tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    data = ManifestDataModule(str(manifest), spatial_dims=2, mask_column="mask", patient_column="patient",
                              split_column="split", class_names=["ct", "mr"],
                              concepts=[{"name": "size_mm", "kind": "continuous", "unit": "mm"}])
    try:
        data.validate()
    except ManifestError as error:
        assert error.problems and all(isinstance(row, int) and reason for row, _, reason in error.problems)


FAULTS = ["nan", "inf", "blank label", "unknown label", "spaced label", "duplicate id", "long id", "zero spacing",
          "negative spacing", "short spacing", "zero size"]


@st.composite
def generated_manifests(draw, folder: Path) -> tuple[Path, dict]:
    """A small manifest of tiny images (sizes, dtypes, ids, labels, spacings), with at most one fault in it."""
    fault = draw(st.one_of(st.none(), st.sampled_from(FAULTS)))
    count = draw(st.integers(min_value=1, max_value=5))
    faulty = draw(st.integers(min_value=0, max_value=count - 1))
    rows = []
    for number in range(count):
        size = draw(st.sampled_from([(4, 4), (4, 6), (6, 4)]))
        kind = draw(st.sampled_from(["png", "npy_uint8", "npy_int16", "npy_float32", "nifti"]))
        array = np.arange(np.prod(size)).reshape(size) % 7
        if number == faulty and fault in ("nan", "inf"):
            kind = draw(st.sampled_from(["npy_float32", "nifti"]))
            array = array.astype(np.float32)
            array.flat[0] = float(fault)
        name = f"img{number}.{'png' if kind == 'png' else 'nii.gz' if kind == 'nifti' else 'npy'}"
        if kind == "png":
            Image.fromarray(array.astype(np.uint8)).save(folder / name)
        elif kind == "nifti":
            pixdim = draw(st.sampled_from([0.5, 1.0, 2.0]))
            nibabel.save(nibabel.Nifti1Image(array.astype(np.float32), np.diag([pixdim, 1.0, 1.0, 1.0])), folder / name)
        else:
            np.save(folder / name, array.astype(kind.split("_")[1]))
        label = draw(st.sampled_from(["a", "b"]))
        label = {"blank label": "", "unknown label": "c", "spaced label": f" {label} "}.get(fault, label) \
            if number == faulty else label
        sample_id = {"duplicate id": "s0", "long id": "x" * 200}.get(fault, f"s{number}") if number == faulty \
            else draw(st.sampled_from(["", f"s{number}"]))
        rows.append({"image": name, "label": label, "id": sample_id,
                     "patient": draw(st.sampled_from(["p0", "P0 ", "p1", "p2"]))})
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    spacing = {"zero spacing": [0.0, 1.0], "negative spacing": [-1.0, 1.0], "short spacing": [1.0]}.get(
        fault, draw(st.sampled_from([None, [1.0, 1.0], [2.0, 0.5]])))
    size = [0, 4] if fault == "zero size" else draw(st.sampled_from([None, [4, 4], [6, 8]]))
    return manifest, {"spacing_mm": spacing, "spatial_size": size,
                      "class_names": draw(st.sampled_from([None, ["a", "b"]]))}


@settings(max_examples=25, deadline=timedelta(seconds=30), suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_generated_manifests_load_a_batch_or_raise_manifest_error(data, tmp_path_factory) -> None:
    """Issue 21: every generated manifest either validates and yields a training batch, or gets a ManifestError."""
    manifest, options = data.draw(generated_manifests(tmp_path_factory.mktemp("generated")))
    try:
        module = ManifestDataModule(str(manifest), id_column="id", patient_column="patient", batch_size=2,
                                    **options)
        module.setup()
    except ManifestError as error:
        assert error.problems and all(reason for _, _, reason in error.problems)
        return
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].dtype == torch.float32 and torch.isfinite(batch["image"]).all()
    assert batch["image"].shape[1:2] == (1,) and len(set(batch["id"])) == len(batch["id"])
