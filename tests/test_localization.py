from __future__ import annotations

import pytest
import torch

from pellucid.training.elements.localization import (
    ActivationPrecision,
    EnergyInsideMask,
    MaskDice,
    PointingGame,
    class_maps,
    dilate,
)


def square_mask(batch: int = 2, size: int = 8, box: tuple[int, int] = (2, 4)) -> torch.Tensor:
    mask = torch.zeros(batch, 1, size, size)
    mask[:, :, box[0]:box[1], box[0]:box[1]] = 1
    return mask


def test_pointing_game_hits_and_misses_and_skips_empty_masks() -> None:
    mask = square_mask()
    maps = torch.zeros(2, 8, 8)
    maps[0, 3, 3] = 1.0  # inside
    maps[1, 6, 6] = 1.0  # outside
    empty = torch.zeros(1, 1, 8, 8)
    metric = PointingGame()
    metric.update(maps, mask)
    metric.update(torch.rand(1, 8, 8), empty)  # no lesion: ignored
    assert metric.compute().item() == pytest.approx(0.5)
    # the miss at (6, 6) is 3 pixels (chessboard distance) from the square's corner (3, 3)
    for tolerance, expected in ((2, 0.0), (3, 1.0)):
        tolerant = PointingGame(tolerance=tolerance)
        tolerant.update(maps[1:], mask[1:])
        assert tolerant.compute().item() == expected


def test_energy_dice_iou_and_activation_precision() -> None:
    mask = square_mask(1)  # 4 pixels
    maps = torch.zeros(1, 1, 8, 8)
    maps[0, 0, 2:4, 2:4] = 1.0
    maps[0, 0, 6, 6] = 2.0  # mass 4 inside, 2 outside
    energy = EnergyInsideMask()
    energy.update(maps, mask)
    assert energy.compute().item() == pytest.approx(4 / 6)
    dice, iou = MaskDice(threshold=0.5), MaskDice(threshold=0.5, iou=True)
    dice.update(maps, mask), iou.update(maps, mask)
    assert dice.compute().item() == pytest.approx(2 * 4 / (5 + 4))
    assert iou.compute().item() == pytest.approx(4 / 5)
    precision = ActivationPrecision(percentile=90)
    precision.update(maps, mask)  # top 10% of 64 values: the 5 non-zero pixels, 4 inside
    assert precision.compute().item() == pytest.approx(4 / 5)


def test_class_maps_picks_each_samples_class_and_shapes_are_checked() -> None:
    localization = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 2, 2)
    picked = class_maps(localization, torch.tensor([2, 0]))
    assert torch.equal(picked[0], localization[0, 2]) and torch.equal(picked[1], localization[1, 0])
    with pytest.raises(ValueError, match=r"map shape \(2, 4, 4\) and mask shape \(2, 8, 8\) must agree"):
        PointingGame().update(torch.zeros(2, 4, 4), square_mask())
    with pytest.warns(UserWarning, match="called before the ``update``"):
        assert torch.isnan(PointingGame().compute())


def test_three_dimensional_maps() -> None:
    mask = torch.zeros(1, 1, 4, 4, 4)
    mask[0, 0, 1, 1, 1] = 1
    maps = torch.zeros(1, 4, 4, 4)
    maps[0, 1, 1, 1] = 1
    metric = PointingGame()
    metric.update(maps, mask)
    assert metric.compute().item() == 1.0
    assert dilate(mask, 1).sum().item() == 27


def test_class_agnostic_localization_serves_every_class() -> None:
    localization = torch.rand(2, 1, 4, 4)
    assert torch.equal(class_maps(localization, torch.tensor([2, 1])), localization[:, 0])
