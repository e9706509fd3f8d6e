"""Deletion and insertion curves do not depend on the order of tied evidence (tied voxels are deleted as one block)."""

from __future__ import annotations

import pytest
import torch
from explain_toys import fixed_evidence, single_threaded  # noqa: F401 - single_threaded: a fixture

from pellucid.training.elements.evaluator import ExplanationEvaluator
from pellucid.training.elements.faithfulness import (
    curve_area,
    deletion_curve,
    deletion_order,
    insertion_curve,
    tied_share,
)

pytestmark = pytest.mark.usefixtures("single_threaded")
FRACTIONS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
SIZE = 20


def _case() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A model reading only the bottom half, an image bright there, and a map with 40 % of its pixels tied at 0.

    The tied pixels are spread over both halves, so deleting them in raster order (top rows first) leaves the
    prediction alone for a while and deleting them in random order does not.
    """
    rows = torch.arange(SIZE).view(-1, 1).expand(SIZE, SIZE)
    bottom = (rows >= SIZE // 2).float()
    model = fixed_evidence(bottom, "bottom_reader")
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[0.0], [40.0], [0.0]]))
        model.head.bias.copy_(torch.tensor([37.5, 0.0, 0.0]))  # p(class 1) 0.92, 0.18 with a tenth of the bottom gone
    model.eval()
    generator = torch.Generator().manual_seed(0)
    shown = torch.rand(SIZE * SIZE, generator=generator) + 0.1  # distinct values, all above the minimum
    tied = torch.randperm(SIZE * SIZE, generator=generator)[: int(0.4 * SIZE * SIZE)]
    shown[tied] = 0.0
    return model, bottom.view(1, 1, SIZE, SIZE), shown.view(1, SIZE, SIZE)


@torch.no_grad()
def _p(model: torch.nn.Module, image: torch.Tensor) -> float:
    """The model's probability of class 1 for one image."""
    return float(model(image, explain=False).logits.softmax(1)[0, 1])


def _faithfulness(model: torch.nn.Module, image: torch.Tensor, maps: torch.Tensor, tie_order: str,
                  blocks: bool) -> float:
    """reverse_deletion_auc - deletion_auc with tied pixels ordered at random or in raster order."""
    classes = torch.ones(1, dtype=torch.long)
    areas = []
    for least_first in (True, False):
        generator = torch.Generator().manual_seed(7) if tie_order == "random" else None
        order = deletion_order(maps, generator, least_first=least_first)
        curve = deletion_curve(model, image, order, classes, FRACTIONS, "multiclass", maps=maps if blocks else None)
        areas.append(float(curve_area(curve, FRACTIONS)[0]))
    return areas[0] - areas[1]


def test_the_score_moves_by_at_most_002_when_tied_pixels_are_reordered() -> None:
    model, image, maps = _case()
    assert float(tied_share(maps)[0]) == pytest.approx(0.4)
    random_order = _faithfulness(model, image, maps, "random", blocks=True)
    raster_order = _faithfulness(model, image, maps, "raster", blocks=True)
    assert abs(random_order - raster_order) <= 0.02


def test_deleting_tied_pixels_one_by_one_measures_their_order() -> None:
    """The old implementation (every voxel its own block) fails the test above on the same case."""
    model, image, maps = _case()
    random_order = _faithfulness(model, image, maps, "random", blocks=False)
    raster_order = _faithfulness(model, image, maps, "raster", blocks=False)
    assert abs(random_order - raster_order) > 0.05


def test_the_evaluators_deletion_scores_do_not_depend_on_its_seed() -> None:
    """The evaluator used its seed to order ties; now every seed gives the same deletion metrics."""
    model, image, maps = _case()
    batch = {"image": image.expand(3, -1, -1, -1).clone(), "label": torch.ones(3, dtype=torch.long)}
    values = []
    for seed in (0, 1):
        evaluator = ExplanationEvaluator(deletion_samples=3, seed=seed)
        with torch.no_grad():
            output = model(batch["image"], explain=True)
        output.localization = maps.unsqueeze(1).expand(3, 3, SIZE, SIZE)
        evaluator.update(model, output, batch)
        results = evaluator.compute()
        values.append([results.value(name) for name in ("deletion_auc", "reverse_deletion_auc", "insertion_auc",
                                                         "deletion_tied_share")])
    assert values[0] == pytest.approx(values[1], abs=1e-6)
    assert values[0][3] == pytest.approx(0.4)


def test_a_cut_inside_a_tie_block_is_interpolated_between_the_block_boundaries() -> None:
    model, image, maps = _case()
    classes = torch.ones(1, dtype=torch.long)
    order = deletion_order(maps, least_first=True)  # the 160 tied pixels (40 %) come first
    fractions = (0.0, 0.2, 0.4)
    curve = deletion_curve(model, image, order, classes, fractions, "multiclass", maps=maps)[0]
    before, after = _p(model, image), _p(model, torch.where(maps.unsqueeze(1) == 0, image.mean(), image))
    assert float(curve[0]) == pytest.approx(before, abs=1e-6)
    assert float(curve[2]) == pytest.approx(after, abs=1e-6)  # the whole block deleted
    assert float(curve[1]) == pytest.approx(before + 0.5 * (after - before), abs=1e-6)  # half-way


def test_without_ties_the_curve_is_the_voxel_by_voxel_curve_and_insertion_mirrors_deletion() -> None:
    model, image, _ = _case()
    maps = torch.rand(1, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    assert float(tied_share(maps)[0]) == 0.0
    classes = torch.ones(1, dtype=torch.long)
    order = deletion_order(maps)
    blocks = deletion_curve(model, image, order, classes, FRACTIONS, "multiclass", maps=maps)
    voxels = deletion_curve(model, image, order, classes, FRACTIONS, "multiclass")
    assert torch.allclose(blocks, voxels)
    inserted = insertion_curve(model, image, order, classes, FRACTIONS, "multiclass", maps=maps)[0]
    assert float(inserted[0]) == pytest.approx(_p(model, torch.full_like(image, float(image.mean()))), abs=1e-6)
    assert float(inserted[-1]) == pytest.approx(float(blocks[0, 0]), abs=1e-6)


def test_the_tied_share_counts_large_blocks_of_equal_values_not_scattered_pairs() -> None:
    values = torch.arange(1600, dtype=torch.float32)
    values[:480] = 0.0  # one block of 30 %
    values[800:802] = 800.0  # a pair, and a block of 1 % less one voxel
    values[1000:1015] = 1000.0
    assert float(tied_share(values.view(1, 40, 40))[0]) == pytest.approx(0.3)
    values[1015] = 1000.0  # now 1 % of the map
    assert float(tied_share(values.view(1, 40, 40))[0]) == pytest.approx(0.31)


def test_an_order_that_does_not_sort_the_map_is_refused() -> None:
    model, image, maps = _case()
    shuffled = torch.randperm(SIZE * SIZE, generator=torch.Generator().manual_seed(1)).view(1, -1)
    with pytest.raises(ValueError, match="does not sort the maps"):
        deletion_curve(model, image, shuffled, torch.ones(1, dtype=torch.long), FRACTIONS, "multiclass", maps=maps)
