"""Prototype metrics on constructed maps with known answers, their DDP reduction, and the evaluation callback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from synthetic import RandomDataModule
from test_module import trainer

from pellucid.training import InterpretableModule
from pellucid.training.elements.localization import ActivationPrecision
from pellucid.training.elements.visual_recognizability import (
    KNNClassPurity,
    PrototypeActivationPrecision,
    PrototypeConsistency,
    PrototypeEvaluation,
    PrototypePurity,
    PrototypeStability,
    _merge_nearest,
    patch_structure,
)


def peaked_maps(peaks: list[list[tuple[int, int]]], strength: list[list[float]] | None = None) -> torch.Tensor:
    """(B, P, 4, 4) maps, 0.1 everywhere and ``strength`` (default 1) at ``peaks[b][p]``."""
    maps = torch.full((len(peaks), len(peaks[0]), 4, 4), 0.1)
    for b, row in enumerate(peaks):
        for p, (y, x) in enumerate(row):
            maps[b, p, y, x] = 1.0 if strength is None else strength[b][p]
    return maps


def test_patch_structure_marks_cells_touching_the_lesion_with_its_type() -> None:
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, 0, 0:2, 6:8] = 1  # top-right cell of a 4x4 grid
    structure = patch_structure(mask, (4, 4), lesion_type=torch.tensor([5, 2]))
    expected = torch.zeros(2, 4, 4, dtype=torch.long)
    expected[0, 0, 3] = 5
    assert torch.equal(structure, expected)
    assert torch.equal(patch_structure(mask, (4, 4)), (expected > 0).long())


def test_purity_counts_the_most_common_structure_among_the_k_nearest_images() -> None:
    structure = torch.zeros(4, 4, 4, dtype=torch.long)
    structure[:, 0, 0] = torch.tensor([3, 3, 3, 1])  # lesion types under cell (0, 0) of images 0..3
    # prototype 0 peaks on cell (0, 0) everywhere; prototype 1 on (0, 0) in images 0, 1 and on background elsewhere
    peaks = [[(0, 0), (0, 0)], [(0, 0), (0, 0)], [(0, 0), (2, 2)], [(0, 0), (2, 2)]]
    strength = [[0.9, 0.9], [0.8, 0.8], [0.7, 0.7], [0.6, 0.6]]
    purity = PrototypePurity(num_prototypes=2, k=3)
    purity.update(peaked_maps(peaks[:2], strength[:2]), structure[:2])  # two batches: the running top-k merges
    purity.update(peaked_maps(peaks[2:], strength[2:]), structure[2:])
    # k=3 keeps images 0, 1, 2: prototype 0 sees types 3, 3, 3; prototype 1 sees 3, 3, 0
    torch.testing.assert_close(purity.per_prototype(), torch.tensor([1.0, 2 / 3]))
    assert float(purity.compute()) == pytest.approx((1 + 2 / 3) / 2)
    assert purity.majority().tolist() == [3, 3] and purity.structures_shown() == 1  # both show type 3 most
    assert PrototypePurity(num_prototypes=2, k=3).majority().tolist() == [-1, -1]  # never activated
    background = structure.clone()
    background[:, 0, 0] = 0
    other = PrototypePurity(num_prototypes=2, k=3)
    other.update(peaked_maps(peaks, strength), structure)
    other.update(peaked_maps([[(2, 2), (2, 2)]] * 4, [[2.0, 0.1]] * 4), background)  # prototype 0 now on background
    assert other.majority().tolist() == [0, 3] and other.structures_shown() == 2


def test_knn_class_purity_is_the_share_of_nearest_images_of_the_prototype_class() -> None:
    metric = KNNClassPurity(prototype_classes=torch.tensor([0, 1]), k=2)
    maps = peaked_maps([[(0, 0), (0, 0)]] * 3, [[0.9, 0.2], [0.8, 0.9], [0.1, 0.8]])
    metric.update(maps, torch.tensor([0, 0, 1]))
    # prototype 0 nearest: images 0, 1 (both class 0); prototype 1 nearest: images 1 (class 0), 2 (class 1)
    torch.testing.assert_close(metric.per_prototype(), torch.tensor([1.0, 0.5]))
    assert float(metric.compute()) == pytest.approx(0.75)


def test_merge_nearest_is_the_ddp_reduction_of_two_processes_lists() -> None:
    first = torch.tensor([[[0.9, 1.0], [0.2, 2.0]]], dtype=torch.float64)  # (P=1, k=2, 2)
    second = torch.tensor([[[0.5, 3.0], [0.4, 4.0]]], dtype=torch.float64)
    merged = _merge_nearest(torch.stack([first, second]))
    assert merged[0, :, 1].tolist() == [1.0, 3.0]


def test_activation_precision_uses_the_most_activated_own_class_prototype() -> None:
    metric = PrototypeActivationPrecision(prototype_classes=torch.tensor([0, 1, 1]), percentile=90)
    maps = torch.zeros(1, 3, 2, 2)
    maps[0, 1, 0, 0] = 1.0  # own class, on the lesion (top-left quarter)
    maps[0, 2, 1, 1] = 0.5  # own class, weaker, off the lesion
    maps[0, 0, 1, 1] = 9.0  # other class: never chosen
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, :4, :4] = 1
    metric.update(maps, mask, torch.tensor([1]))
    value = float(metric.compute())
    assert value > 0.9
    metric.reset()
    maps[0, 2, 1, 1] = 2.0  # now the off-lesion own-class prototype is the most activated
    metric.update(maps, mask, torch.tensor([1]))
    assert float(metric.compute()) < 0.1
    diagonal = torch.zeros(1, 1, 4, 4)
    diagonal[0, 0, 1, 1] = diagonal[0, 0, 2, 2] = 1.0  # two cells meeting at a corner, where the lesion is
    lesion = torch.zeros(1, 1, 16, 16)
    lesion[0, 0, 6:10, 6:10] = 1
    scores = {}
    for mode in ("linear", "cubic"):
        metric = PrototypeActivationPrecision(torch.tensor([1]), 95, mode)
        metric.update(diagonal, lesion, torch.tensor([1]))
        scores[mode] = float(metric.compute())
    reference = ActivationPrecision(95)
    reference.update(F.interpolate(diagonal, size=(16, 16), mode="bicubic", align_corners=False), lesion)
    assert scores["cubic"] == pytest.approx(float(reference.compute()))  # upsampled as the model's localization
    assert scores["cubic"] > scores["linear"] + 0.2  # the cubic map's top lies between the two cells, on the lesion


def test_consistency_needs_the_same_structure_in_most_images_of_the_class() -> None:
    structure = torch.zeros(5, 4, 4, dtype=torch.long)
    structure[:, 1, 1] = 1  # the lesion sits in cell (1, 1) of every image
    # prototype 0 (class 0) on the lesion in 4 of 5 class-0 images; prototype 1 (class 0) in 2 of 5
    peaks = [[(1, 1), (1, 1)], [(1, 1), (1, 1)], [(1, 1), (3, 3)], [(1, 1), (3, 3)], [(3, 3), (3, 3)]]
    metric = PrototypeConsistency(torch.tensor([0, 0]), num_structures=2, threshold=0.8)
    metric.update(peaked_maps(peaks), structure, torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(metric.frequencies(), torch.tensor([0.8, 0.6]))
    assert float(metric.compute()) == 0.5


def test_stability_is_the_share_of_peaks_on_the_same_structure_under_noise() -> None:
    structure = torch.zeros(2, 4, 4, dtype=torch.long)
    structure[:, 0, 0] = 1
    clean = peaked_maps([[(0, 0), (0, 0)], [(0, 0), (0, 0)]])
    noisy = peaked_maps([[(0, 0), (3, 3)], [(0, 0), (3, 3)]])  # prototype 1 leaves the lesion (image 1 is its class)
    metric = PrototypeStability(torch.tensor([0, 1]))
    metric.update(clean, noisy, structure, torch.tensor([0, 1]))  # each prototype sees one image of its class
    assert float(metric.compute()) == pytest.approx(0.5)


def test_evaluation_callback_logs_every_prototype_metric(tmp_path) -> None:
    tiny = {"prototypes_per_class": 2, "prototype_channels": 8,
            "backbone_kwargs": {"channels": [8, 16], "strides": [2, 2]}}
    module = InterpretableModule("protopnet", spatial_dims=2, in_channels=1, num_classes=3, model_kwargs=tiny)
    results = trainer(tmp_path, callbacks=[PrototypeEvaluation(k=3)]).test(module, datamodule=RandomDataModule())
    names = ["purity", "knn_class_purity", "activation_precision", "consistency", "stability"]
    values = [results[0][f"test/prototype_{name}"] for name in names]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert 1 <= results[0]["test/prototype_structures_shown"] <= 6
