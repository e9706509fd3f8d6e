"""Concept maps of cbm / cem, their mask-guidance term, and the concept-map pointing game."""

from __future__ import annotations

import math

import pytest
import torch

from pellucid.models import create_model
from pellucid.models.concept_guidance import concept_map_guidance_loss, guided_pairs
from pellucid.models.concepts import ConceptSpec
from pellucid.training.elements.concept_maps import ConceptMapPointing, concept_shown

SPECS = [ConceptSpec("size_mm", "continuous", "mm", "size", "Size."),
         ConceptSpec("spiky", "binary", None, "margin", "Spiky."),
         ConceptSpec("bright", "binary", None, "calcification", "Bright dots.")]


def lesion_mask(spatial_dims: int, batch: int = 2, size: int = 16) -> torch.Tensor:
    mask = torch.zeros(batch, 1, *([size] * spatial_dims))
    mask[0, 0, :4, :4] = 1.0  # sample 0: lesion on the first 4x4 cell of a 4-cell grid; sample 1: none
    return mask


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", ["cbm", "cem"])
def test_concept_maps_average_to_the_raw_concepts(name: str, spatial_dims: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, spatial_dims=spatial_dims, num_classes=3, concepts=SPECS).eval()
    output = model(torch.rand(2, 1, *([16] * spatial_dims)), explain=False)
    raw = model.concept_bank.logits_to_raw(output.concept_logits)
    bias = model.concept_bias if name == "cbm" else model.scorer_bias
    assert output.concept_maps.shape[:2] == (2, len(SPECS))
    torch.testing.assert_close(output.concept_maps.flatten(2).mean(dim=2) + bias, raw, atol=1e-5, rtol=1e-5)


def test_guided_pairs_are_present_binary_findings_on_scans_with_a_lesion() -> None:
    model = create_model("cbm", spatial_dims=2, num_classes=3, concepts=SPECS)
    targets = torch.tensor([[6.0, 1.0, math.nan], [6.0, 1.0, 1.0]])
    guided = guided_pairs(targets, lesion_mask(2), model.concept_bank)
    assert guided.tolist() == [[False, True, False], [False, False, False]]


def test_named_concepts_guide_continuous_measurements_wherever_annotated_on_a_lesion() -> None:
    model = create_model("cbm", spatial_dims=2, num_classes=3, concepts=SPECS,
                         mask_guided_concepts=["size_mm", "spiky"])
    targets = torch.tensor([[6.0, 0.0, 1.0], [6.0, 1.0, 1.0]])
    guided = guided_pairs(targets, lesion_mask(2), model.concept_bank, model.mask_guided)
    # sample 0: the size is guided (annotated), "spiky" is absent, "bright" is not named; sample 1 has no lesion
    assert guided.tolist() == [[True, False, False], [False, False, False]]
    targets[0, 0] = math.nan  # an unannotated measurement is not guided
    assert not guided_pairs(targets, lesion_mask(2), model.concept_bank, model.mask_guided).any()


@pytest.mark.parametrize("name", ["cbm", "cbm_spatial", "cem"])
def test_guiding_an_unknown_concept_is_one_clear_error(name: str) -> None:
    with pytest.raises(ValueError, match=r"mask_guided_concepts: expected .*'size_mm'.* got \['diameter'\]"):
        create_model(name, spatial_dims=2, num_classes=3, concepts=SPECS, mask_guided_concepts=["diameter"])


def test_guidance_loss_is_low_only_when_the_map_peaks_on_the_lesion() -> None:
    mask = lesion_mask(2)
    guided = torch.tensor([[True], [False]])
    on, off = torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)
    on[0, 0, 0, 0], off[0, 0, 3, 3] = 20.0, 20.0  # the lesion covers cell (0, 0) fully
    assert float(concept_map_guidance_loss(on, mask, guided)) < 1e-6
    assert float(concept_map_guidance_loss(off, mask, guided)) > 0.99
    scores = torch.zeros(2, 1, 4, 4, requires_grad=True)
    concept_map_guidance_loss(scores, mask, guided).backward()
    assert float(scores.grad[0, 0, 0, 0]) < 0 < float(scores.grad[0, 0, 3, 3])  # raise the lesion cell, lower others
    assert float(scores.grad[1].abs().sum()) == 0.0  # the unguided sample is left alone
    empty = concept_map_guidance_loss(scores, mask, torch.zeros(2, 1, dtype=torch.bool))
    assert float(empty.detach()) == 0.0 and empty.requires_grad


@pytest.mark.parametrize("name", ["cbm", "cbm_spatial", "cem"])
def test_guided_training_moves_the_finding_map_onto_the_lesion(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, spatial_dims=2, num_classes=3, concepts=SPECS, mask_guidance=True,
                         backbone_kwargs={"channels": [8, 8], "strides": [2, 2]})
    image, mask = torch.rand(2, 1, 16, 16), lesion_mask(2)
    batch = {"image": image, "label": torch.tensor([1, 0]), "mask": mask,
             "concepts": torch.tensor([[6.0, 1.0, 0.0], [0.0, 0.0, 0.0]])}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        term = model.loss_terms(model(image, explain=False), batch)["mask_guidance"]
        first = float(term.detach()) if first is None else first
        optimizer.zero_grad()
        term.backward()
        optimizer.step()
    assert float(term) < 0.5 * first


def test_pointing_counts_only_scans_that_show_the_finding() -> None:
    metric = ConceptMapPointing(SPECS)
    maps = torch.zeros(2, 3, 4, 4)
    maps[:, 1, 0, 0] = 1.0  # spiky peaks on the lesion of sample 0
    maps[:, 0, 3, 3] = 1.0  # size peaks off it
    targets = torch.tensor([[6.0, 1.0, 0.0], [6.0, 1.0, 1.0]])  # sample 1 has no lesion: not counted
    metric.update(maps, lesion_mask(2), targets)
    result = metric.compute()
    assert result["spiky"] == 1.0 and result["size_mm"] == 0.0
    assert math.isnan(result["bright"])  # annotated absent on sample 0; bright's map is constant anyway
    assert result["lesion_findings"] == 1.0
    assert concept_shown(targets, SPECS).tolist() == [[True, True, False], [True, True, True]]


def test_a_constant_map_points_at_nothing() -> None:
    metric = ConceptMapPointing(SPECS)
    metric.update(torch.zeros(1, 3, 4, 4), lesion_mask(2, batch=1), torch.tensor([[6.0, 1.0, 1.0]]))
    assert metric.compute()["lesion_findings"] == 0.0
