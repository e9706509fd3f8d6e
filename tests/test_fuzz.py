"""Property-based tests: the validators raise only their declared errors, whatever they are given."""

from __future__ import annotations

import csv
import string
from pathlib import Path

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

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
