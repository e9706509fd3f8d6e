"""Counterfactual twins of phantom scans and the counterfactual metrics computed on them."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from explain_toys import fixed_evidence, single_threaded  # noqa: F401 - single_threaded: a fixture
from synthetic import RandomDataModule

from pellucid.models import InterpretableModel, ModelOutput
from pellucid.models.registry import ModelSpec
from pellucid.training import InterpretableModule
from pellucid.training.data.phantom import (
    CALCIFIED,
    DIAMETER,
    IRREGULAR,
    LABEL_RULE,
    PHANTOM_CONCEPTS,
    SPICULATED,
    PhantomConfig,
    PhantomGenerator,
)
from pellucid.training.data.phantom_datamodule import PhantomDataModule
from pellucid.training.data.phantom_twins import TWIN_CHANGES, render_twins
from pellucid.training.elements.callback import FiveElementMetrics
from pellucid.training.elements.counterfactual import NOT_APPLICABLE, correctness_pairs

pytestmark = pytest.mark.usefixtures("single_threaded")
FINDINGS = {"no_spiculation": SPICULATED, "no_calcification": CALCIFIED, "no_irregularity": IRREGULAR}


@pytest.fixture(scope="module")
def generator() -> PhantomGenerator:
    return PhantomGenerator(PhantomConfig(image_size=32, spacing_mm=1.5, diameter_range_mm=(3.0, 14.0), max_lesions=2,
                                          shortcut={"test": 0.5}), seed=0)


@pytest.fixture(scope="module")
def twins(generator: PhantomGenerator) -> list[dict]:
    return [render_twins(generator, "test", index) for index in range(60)]


# ------------------------------------------------------------------------------------------------- twins
def test_the_twins_original_is_the_generators_sample_bit_for_bit(generator, twins) -> None:
    for index, found in enumerate(twins[:20]):
        sample, original = generator.sample("test", index), found["no_lesion"].original
        for field in ("image", "mask", "body_mask", "concepts", "lesion_concepts", "confounder_mask"):
            assert getattr(sample, field).tobytes() == getattr(original, field).tobytes(), field
        assert (sample.label, sample.lesion_type, sample.shortcut_present, sample.id) == \
            (original.label, original.lesion_type, original.shortcut_present, original.id)
    three_d = PhantomGenerator(PhantomConfig(spatial_dims=3, image_size=16, spacing_mm=3.0,
                                             diameter_range_mm=(4.0, 8.0)), seed=1)
    assert three_d.twin("val", 2, "no_lesion").original.image.tobytes() == three_d.sample("val", 2).image.tobytes()


def _changed(found, change: str) -> np.ndarray:
    """Where a change may alter the scan, from the two scans' own ground truth (not from the twin's region)."""
    original, twin = found.original, found.twin
    if change == "no_marker":
        return original.confounder_mask > 0
    if change == "normal":
        return (original.mask > 0) | (original.confounder_mask > 0)
    return (original.mask > 0) | (twin.mask > 0)  # the index lesion's old and new extent


@pytest.mark.parametrize("change", TWIN_CHANGES)
def test_a_twin_equals_its_original_outside_the_changed_region_and_follows_the_label_rule(twins, change) -> None:
    applied = 0
    for found in (row[change] for row in twins):
        original, twin = found.original, found.twin
        if not found.applicable:
            assert twin.image.tobytes() == original.image.tobytes() and not found.region.any()
            continue
        applied += 1
        outside = ~_changed(found, change)
        assert np.array_equal(twin.image[outside], original.image[outside])  # bit for bit
        assert found.region.any() and not (found.region & outside).any()
        assert twin.label == int(LABEL_RULE.label_from_concepts(twin.concepts))
        assert twin.id == f"{original.id}+{change}"
    assert applied >= 5


@pytest.mark.parametrize("change", sorted(FINDINGS))
def test_removing_a_finding_sets_only_that_concept_and_keeps_the_rest_of_the_lesion(twins, change) -> None:
    column = FINDINGS[change]
    for found in (row[change] for row in twins):
        present = found.original.concepts[column] >= 0.5
        assert found.applicable == bool(present)
        if not present:
            continue
        expected = found.original.concepts.copy()
        expected[column] = 0.0
        if len(found.original.lesion_concepts) == 1:  # with two lesions the other one may become the index lesion
            assert np.array_equal(found.twin.concepts, expected)
        if change == "no_spiculation":  # spicules go, the core and its calcification dots stay
            assert np.all(found.twin.mask <= found.original.mask)
            assert np.array_equal(found.region, (found.original.mask > 0) & (found.twin.mask == 0))


def test_the_diameter_twin_crosses_the_size_threshold_and_stays_inside_the_body(twins) -> None:
    threshold = LABEL_RULE.large_diameter_mm
    crossed = 0
    for found in (row["cross_diameter"] for row in twins):
        if not found.applicable:
            continue
        index = int(np.argmax(np.all(found.original.lesion_concepts == found.original.concepts, axis=1)))
        before = found.original.lesion_concepts[index, DIAMETER]
        after_values = found.twin.lesion_concepts[:, DIAMETER]
        after = after_values[~np.isin(after_values, found.original.lesion_concepts[:, DIAMETER])]
        assert len(after) == 1 and (before >= threshold) != (after[0] >= threshold)
        assert not ((found.twin.mask > 0) & ~found.twin.body_mask).any()
        crossed += 1
    assert crossed >= 10


def test_no_lesion_and_normal_twins_remove_the_lesions_and_the_marker(twins) -> None:
    for row in twins:
        original = row["normal"].original
        if len(original.lesion_concepts) == 1:
            assert row["no_lesion"].twin.label == 0 and row["no_lesion"].twin.mask.max() == 0
        if row["normal"].applicable:
            assert row["normal"].twin.label == 0 and row["normal"].twin.mask.max() == 0
            assert not row["normal"].twin.shortcut_present
        assert row["no_marker"].applicable == original.shortcut_present


def test_unknown_changes_and_foreign_ids_are_refused(generator) -> None:
    with pytest.raises(ValueError, match="twin change must be one of"):
        generator.twin("test", 0, "no_tissue")
    data = PhantomDataModule(image_size=32, spacing_mm=1.5, diameter_range_mm=(3.0, 14.0), num_test=4)
    with pytest.raises(ValueError, match="is not a phantom2d sample id"):
        data.counterfactual_twins(["medmnist-0001"], ("no_lesion",))


def test_the_data_module_gives_twin_batches_aligned_with_its_batches() -> None:
    data = PhantomDataModule(image_size=32, spacing_mm=1.5, diameter_range_mm=(3.0, 14.0), num_test=6, batch_size=6)
    batch = next(iter(data.test_dataloader()))
    found = data.counterfactual_twins(batch["id"])
    assert set(found) == set(TWIN_CHANGES)
    for twin in found.values():
        assert torch.equal(twin.original, batch["image"]) and twin.image.shape == batch["image"].shape
        assert twin.region.shape == batch["image"].shape and twin.concepts.shape == batch["concepts"].shape
    has_lesion = batch["mask"].flatten(1).amax(dim=1) > 0
    assert torch.equal(found["no_lesion"].applicable, has_lesion)
    assert torch.equal(found["no_lesion"].label[has_lesion], torch.zeros(int(has_lesion.sum()), dtype=torch.long))


# ----------------------------------------------------------------------------------------------- metrics
def test_correctness_pairs_score_order_agreement_ties_and_skip_close_effects() -> None:
    importance = torch.tensor([[0.9, 0.1, 0.5, 0.5]])
    effect = torch.tensor([[0.8, 0.0, 0.3, 0.31]])
    present = torch.tensor([[True, True, True, False]])
    # pairs (0,1) agree, (0,2) agree, (1,2) agree; part 3 absent
    assert correctness_pairs(importance, effect, present).tolist() == [1.0, 1.0, 1.0]
    reversed_ = correctness_pairs(-importance, effect, present)
    assert reversed_.tolist() == [0.0, 0.0, 0.0]
    flat = correctness_pairs(torch.zeros(1, 4), effect, torch.ones(1, 4, dtype=torch.bool))
    assert flat.tolist() == [0.5] * 5  # (2, 3) differ by 0.01 < 0.05: not ranked


class LesionReader(InterpretableModel):
    """Reads the bright pixels (the lesion), shows them or an empty map, and reads its concepts off them.

    Concepts: diameter from the bright area, contrast from the peak, irregular and spiculated from the area,
    calcified from the peak (the dots are the brightest pixels); ``constant_concepts`` predicts fixed concepts.
    """

    def __init__(self, show_lesion: bool = True, constant_concepts: bool = False) -> None:
        super().__init__(2, 1, 3)
        self.model_spec = ModelSpec(name="lesion_reader", kwargs={"spatial_dims": 2})  # lets the module take it
        self.show_lesion, self.constant_concepts = show_lesion, constant_concepts
        self.concept_specs = list(PHANTOM_CONCEPTS)
        self.head = torch.nn.Linear(1, 3)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[-30.0], [0.0], [30.0]]))
            self.head.bias.copy_(torch.tensor([3.0, 0.0, -3.0]))

    def forward(self, image: torch.Tensor, *, explain: bool = True) -> ModelOutput:
        evidence = (image[:, 0] - 0.6).clamp(min=0)  # tissue is 0.4 +- 0.1, a lesion adds 0.3 to 1.0
        logits = self.head(evidence.flatten(1).sum(1, keepdim=True) / 20.0)
        area, peak = (evidence > 0).flatten(1).sum(1).float(), evidence.flatten(1).amax(1)
        concepts = torch.stack([2 * (area / torch.pi).sqrt(), peak, (area - 30) / 10, (area - 30) / 10,
                                (peak - 1.0) * 10], dim=1)
        if self.constant_concepts:
            concepts = torch.zeros_like(concepts)
        shown = evidence / evidence.flatten(1).amax(1).clamp(min=1e-6).view(-1, 1, 1)
        shown = shown if self.show_lesion else torch.zeros_like(shown)
        return ModelOutput(logits=logits, localization=shown.unsqueeze(1).expand(-1, 3, -1, -1) if explain else None,
                           concept_logits=concepts)

    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        return {"head": list(self.head.parameters())}


def _results(model: InterpretableModel, data, tmp_path, **options):
    callback = FiveElementMetrics(deletion_samples=0, **options)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tmp_path, callbacks=[callback])
    trainer.test(InterpretableModule(model, task="multiclass"), datamodule=data, verbose=False)
    return callback.results["test"]


def _phantom() -> PhantomDataModule:
    return PhantomDataModule(image_size=32, spacing_mm=1.5, diameter_range_mm=(3.0, 14.0), num_test=48, batch_size=16,
                             noise_std=0.0, p_normal=0.0)


def test_an_explanation_on_what_the_model_reads_is_counterfactually_right_and_an_empty_one_is_not(tmp_path) -> None:
    right, empty = _results(LesionReader(), _phantom(), tmp_path), _results(LesionReader(False), _phantom(), tmp_path)
    assert right.value("counterfactual_completeness") > 0.9
    assert empty.value("counterfactual_completeness") < 0.2  # only the share n / V of the lesion's effect
    assert empty.value("counterfactual_correctness") == pytest.approx(0.5)  # equal importance everywhere
    assert right.value("counterfactual_correctness") > 0.9
    assert right.value("counterfactual_effect/no_lesion") > 0.3
    assert right.value("counterfactual_label_agreement") is not None
    assert NOT_APPLICABLE not in right.notes["transparency"]


def test_the_concept_direction_follows_concepts_read_off_the_finding_and_not_fixed_ones(tmp_path) -> None:
    reading = _results(LesionReader(), _phantom(), tmp_path)
    fixed = _results(LesionReader(constant_concepts=True), _phantom(), tmp_path)
    for concept in ("diameter_mm", "spiculated", "calcified"):
        assert reading.value(f"counterfactual_concept_direction/{concept}") == pytest.approx(1.0), concept
    assert reading.value("counterfactual_concept_leakage") > 0.0  # irregular and spiculated both read the area
    assert fixed.value("counterfactual_concept_direction") == 0.0
    assert fixed.value("counterfactual_concept_leakage") == 0.0


def test_data_without_twins_leaves_the_counterfactual_rows_empty_with_the_reason(tmp_path) -> None:
    model = fixed_evidence(torch.ones(32, 32), "uniform")
    results = _results(model, RandomDataModule(spatial_dims=2, num_samples=8, batch_size=4), tmp_path)
    assert results.value("counterfactual_correctness") is None and results.value("counterfactual_completeness") is None
    assert results.value("counterfactual_concept_direction") is None
    assert NOT_APPLICABLE in results.notes["transparency"]
    assert NOT_APPLICABLE in results.notes["physical_attribution"]


def test_counterfactual_samples_bounds_the_scans_that_get_twins(tmp_path) -> None:
    none = _results(LesionReader(), _phantom(), tmp_path, counterfactual_samples=0)
    assert none.value("counterfactual_correctness") is None and none.value("counterfactual_completeness") is None
    with pytest.raises(KeyError):  # family members appear only where measured
        none.value("counterfactual_effect/normal")
