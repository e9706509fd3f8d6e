"""Distinct prototype sources: push (and PIP-Net's sources) give every prototype its own patch, exactly as a greedy
assignment by distance over every candidate would, whatever the batches; the evaluation counts duplicates."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from synthetic import _Samples, make_batch
from test_push import TINY, PushData
from torch.utils.data import DataLoader

from pellucid.models import create_model, load_pretrained
from pellucid.models.recipe import PushOptions, Recipe
from pellucid.training import InterpretableModule
from pellucid.training.cli import build_cli
from pellucid.training.elements.evaluator import ExplanationEvaluator
from pellucid.training.elements.registry import get_metric
from pellucid.training.elements.visual_recognizability import duplicate_sources
from pellucid.training.evaluate import phantom_batch
from pellucid.training.prototypes.push import push_dataloader, push_prototypes, source_gaps
from pellucid.training.prototypes.push_data import _IndexedDataset
from pellucid.training.prototypes.sources import find_prototype_sources
from pellucid.training.recipes import recipe_callbacks

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def colliding_model(spatial_dims: int = 2, per_class: int = 3, name: str = "protopnet"):
    """A tiny prototype network whose prototypes of each class are all the same vector: they all want one patch."""
    torch.manual_seed(0)
    model = create_model(name, spatial_dims, in_channels=1, num_classes=3,
                         **{**TINY, "prototypes_per_class": per_class}).eval()
    with torch.no_grad():
        for klass in range(3):
            members = (model.prototypes.prototype_classes == klass).nonzero().flatten()
            model.prototypes.vectors[members] = model.prototypes.vectors[members[0]].clone()
    return model


def samples(spatial_dims: int, count: int = 15, multi_label: bool = False) -> _Samples:
    batch = make_batch(spatial_dims, count, seed=3)
    batch["label"] = torch.ones(count, 3) if multi_label else torch.arange(count) % 3
    return _Samples(batch)


def brute_force_greedy(model, dataset) -> tuple[dict[int, tuple[int, int]], torch.Tensor]:
    """Prototype -> (sample, flat cell): the greedy over every (distance, sample, cell, prototype) of the set."""
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    labels = torch.stack([dataset[i]["label"] for i in range(len(dataset))])
    with torch.no_grad():
        distances = model.push_candidates(images).distances  # (N, P, L), one batch of everything
    own = model.own_prototypes(labels)  # (N, P)
    pairs = sorted((float(distances[i, p, cell]), i, cell, p) for i, p in own.nonzero().tolist()
                   for cell in range(distances.shape[2]))
    chosen: dict[int, tuple[int, int]] = {}
    for _, sample, cell, prototype in pairs:
        if prototype not in chosen and (sample, cell) not in chosen.values():
            chosen[prototype] = (sample, cell)
    return chosen, distances


def flat_cell(source) -> int:
    cell = 0
    for coordinate, extent in zip(source.feature_index, source.feature_size, strict=True):
        cell = cell * extent + coordinate
    return cell


class CountingLoader:
    """A loader that counts the passes over it."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader, self.passes = loader, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.loader)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_identical_prototypes_get_distinct_patches_by_the_exact_greedy_and_equal_them(spatial_dims: int) -> None:
    model, data = colliding_model(spatial_dims), samples(spatial_dims)
    expected, distances = brute_force_greedy(model, data)
    plain = colliding_model(spatial_dims)
    shared = push_prototypes(plain, push_dataloader(data, batch_size=4), unique_sources=False).sources
    assert len({(s.sample_index, tuple(s.feature_index)) for s in shared}) == 3  # the original: one patch per class
    report = push_prototypes(model, push_dataloader(data, batch_size=4), epoch=5)
    sources = model.prototypes.sources
    assert report.pushed == 9 and report.displaced == 6  # each class's first prototype keeps the patch
    assert len({(s.sample_id, tuple(s.feature_index)) for s in sources}) == 9
    assert duplicate_sources(model.prototype_provenance()) == 0 and duplicate_sources(plain.prototype_provenance()) == 6
    assert {p: (s.sample_index, flat_cell(s)) for p, s in enumerate(sources)} == expected
    for p, source in enumerate(sources):
        assert source.label == int(model.prototypes.prototype_classes[p]) and source.epoch == 5
        assert source.sample_id == data[source.sample_index]["id"]
        assert source.distance == pytest.approx(float(distances[source.sample_index, p, flat_cell(source)]),
                                                rel=1e-4, abs=1e-5)
    assert float(source_gaps(model, data).max()) < 1e-5  # each prototype *is* its source patch
    with torch.no_grad():  # and exactly the vector the push read: the same batch of four gives the same bits
        first = sources[0].sample_index // 4 * 4
        features = model.forward_features(torch.stack([data[i]["image"] for i in range(first, first + 4)]))
    vector = features[sources[0].sample_index - first].flatten(1)[:, flat_cell(sources[0])]
    assert torch.equal(model.prototypes.vectors[0], vector)


def test_the_assignment_does_not_depend_on_batch_size_or_order() -> None:
    data = samples(2)
    results = []
    for batch_size, order in ((1, None), (4, None), (7, None), (15, None), (4, list(reversed(range(15)))),
                              (6, torch.randperm(15, generator=torch.Generator().manual_seed(1)).tolist())):
        model = colliding_model()
        loader = push_dataloader(data, batch_size) if order is None else DataLoader(
            _IndexedDataset(data), batch_size=batch_size, sampler=order)
        push_prototypes(model, loader)
        results.append(([(s.sample_index, s.feature_index) for s in model.prototypes.sources],
                        model.prototypes.vectors.clone()))
    for chosen, vectors in results[1:]:
        assert chosen == results[0][0]
        torch.testing.assert_close(vectors, results[0][1], rtol=1e-5, atol=1e-6)


def test_prototypes_that_find_their_k_candidates_taken_are_looked_up_again_so_the_result_stays_exact() -> None:
    model, data = colliding_model(per_class=2), samples(2, multi_label=True)
    with torch.no_grad():  # every image has every class: all six prototypes compete, two per class are kept at first
        model.prototypes.vectors[:] = model.prototypes.vectors[0].clone()
    expected, _ = brute_force_greedy(model, data)
    loader = CountingLoader(push_dataloader(data, batch_size=4))
    report = push_prototypes(model, loader)
    assert loader.passes > 1  # k = 2 was too few: the pass was repeated with more
    assert {p: (s.sample_index, flat_cell(s)) for p, s in enumerate(report.sources)} == expected
    assert len(set(expected.values())) == 6 and float(source_gaps(model, data).max()) < 1e-5


def test_within_mask_and_one_image_per_prototype_still_hold_with_distinct_patches() -> None:
    model, data = colliding_model(), PushData().data
    data.batch["mask"].zero_()
    data.batch["mask"][:, 0, 8:20, 8:20] = 1  # feature cells 2..4 in both axes
    push_prototypes(model, push_dataloader(data, batch_size=4), within_mask=True)
    cells = [tuple(s.feature_index) for s in model.prototypes.sources]
    assert all(2 <= row <= 4 and 2 <= col <= 4 for row, col in cells)
    assert len({(s.sample_index, tuple(s.feature_index)) for s in model.prototypes.sources}) == 9
    images = colliding_model()
    push_prototypes(images, push_dataloader(data, batch_size=4), unique=True)
    assert len({s.sample_index for s in images.prototypes.sources}) == 9


def test_pipnet_prototypes_with_one_peak_are_shown_with_distinct_patches_by_value() -> None:
    torch.manual_seed(0)
    model = create_model("pipnet", 2, in_channels=1, num_classes=3, presence_threshold=0.0,
                         backbone_kwargs={"channels": [8, 16], "strides": [2, 2]}, num_prototypes=6).eval()
    with torch.no_grad():
        model.add_on.weight[1] = model.add_on.weight[0]  # prototypes 0 and 1 identical: the same maps
    data = samples(2, count=9)
    shared = find_prototype_sources(model, push_dataloader(data, 4), unique_sources=False).sources
    assert (shared[0].sample_index, shared[0].feature_index) == (shared[1].sample_index, shared[1].feature_index)
    report = find_prototype_sources(model, push_dataloader(data, 3), epoch=4)
    with torch.no_grad():
        maps = model(torch.stack([data[i]["image"] for i in range(9)])).prototype_maps.flatten(2)  # (N, P, L)
    pairs = sorted((-float(maps[i, p, cell]), i, cell, p) for i in range(9) for p in range(6)
                   for cell in range(maps.shape[2]) if maps[i, p, cell] > 0)
    expected: dict[int, tuple[int, int]] = {}
    for _, sample, cell, prototype in pairs:
        if prototype not in expected and (sample, cell) not in expected.values():
            expected[prototype] = (sample, cell)
    found = {p: (s.sample_index, flat_cell(s)) for p, s in enumerate(report.sources) if s is not None}
    assert found == expected and len(set(found.values())) == len(found) >= 2
    assert report.displaced >= 1 and report.logits.shape == (9, 3)
    for p, source in found.items():
        assert math.isclose(report.sources[p].distance, 1.0 - float(maps[source[0], p, source[1]]), abs_tol=1e-6)


def test_unique_sources_is_on_by_default_and_a_config_turns_it_off(tmp_path) -> None:
    assert PushOptions().unique_sources
    assert Recipe.from_dict({"push": {"unique_sources": False}}).push == PushOptions(unique_sources=False)
    module = InterpretableModule("protopnet", spatial_dims=2, in_channels=1, num_classes=3, model_kwargs=TINY)
    (push,) = [c for c in recipe_callbacks(module.recipe, 3) if hasattr(c, "unique_sources")]
    assert push.unique_sources
    config = tmp_path / "duplicates.yaml"
    config.write_text("model:\n  model: protopnet\n  recipe:\n    push:\n      unique_sources: false\n")
    cli = build_cli(["--config", str(CONFIGS / "data" / "phantom2d.yaml"), "--config", str(config),
                     "--trainer.logger=false"], run=False)
    assert cli.model.recipe.push.unique_sources is False
    (push,) = [c for c in recipe_callbacks(cli.model.recipe, 3) if hasattr(c, "unique_sources")]
    assert push.unique_sources is False


def test_duplicate_sources_counts_prototypes_showing_a_patch_shown_before() -> None:
    def entry(sample: str, cell: list[int], pruned: str | None = None) -> dict:
        return {"sample_id": sample, "feature_index": cell, "pruned": pruned}

    assert duplicate_sources([None, None]) is None
    provenance = [entry("a", [1, 2]), entry("a", [1, 2]), entry("a", [2, 1]), None, entry("b", [1, 2]),
                  entry("a", [1, 2]), entry("b", [1, 2], pruned="duplicate of prototype 4")]
    assert duplicate_sources(provenance) == 2  # prototypes 1 and 5; the pruned one no longer shows anything
    metric = get_metric("duplicate_prototype_sources")
    assert metric.element == "visual_recognizability" and metric.higher_is_better is False


def test_the_evaluation_reports_the_duplicate_sources_of_the_shipped_2d_protopnet() -> None:
    model, _ = load_pretrained("protopnet_phantom2d")
    provenance = model.prototype_provenance()
    shown = [(s["sample_id"], tuple(s["feature_index"])) for s in provenance if s is not None and not s.get("pruned")]
    batch = phantom_batch(2, batch_size=4)
    evaluator = ExplanationEvaluator(deletion_samples=0)
    with torch.no_grad():
        evaluator.update(model.eval(), model(batch["image"]), batch)
    values = {row.name: row.value for row in evaluator.compute().metrics}
    assert values["duplicate_prototype_sources"] == len(shown) - len(set(shown))  # whatever the bundle holds now
    blackbox = create_model("blackbox", 2, in_channels=1, num_classes=3).eval()
    evaluator.reset()
    with torch.no_grad():
        evaluator.update(blackbox, blackbox(batch["image"]), batch)
    assert {row.name: row.value for row in evaluator.compute().metrics}["duplicate_prototype_sources"] is None
