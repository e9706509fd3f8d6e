"""Inputs real data brings: RGB, anisotropic 3D volumes, scans without lesions, odd sizes — every model."""

from __future__ import annotations

import pytest
import torch

from pellucid.models import create_model, list_models, validate_output
from pellucid.training.data import PhantomDataModule
from pellucid.training.elements.localization import PointingGame, class_maps

MODELS = list_models()


@pytest.mark.parametrize("name", MODELS)
def test_rgb_input(name: str) -> None:
    model = create_model(name, 2, in_channels=3, num_classes=2).eval()
    image = torch.rand(2, 3, 40, 24)
    validate_output(model(image), image, num_classes=None)


@pytest.mark.parametrize("name", MODELS)
def test_anisotropic_3d_phantom_without_lesions(name: str) -> None:
    data = PhantomDataModule(spatial_dims=3, image_size=[32, 40, 24], spacing_mm=[2.5, 2.0, 3.0], p_normal=1.0,
                             num_train=2, batch_size=2)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert batch["mask"].sum() == 0 and batch["label"].tolist() == [0, 0]
    model = create_model(name, 3, in_channels=1, num_classes=data.num_classes).eval()
    output = model(batch["image"])
    validate_output(output, batch["image"])
    pointing = PointingGame()
    pointing.update(class_maps(output.localization, batch["label"]), batch["mask"])  # empty masks are skipped
    assert pointing.count == 0
