"""Grad-CAM of the black-box baseline equals the class activation map it must reduce to."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pellucid.models import create_model
from pellucid.models.gradcam import normalize_per_map


def test_gradcam_matches_cam_for_average_pooled_linear_head() -> None:
    # With global average pooling and a linear head, Grad-CAM's channel weights are w_k / |s|,
    # so the map is ReLU(sum_c w_kc A_c) up to a positive scale (Selvaraju et al., section 3).
    torch.manual_seed(0)
    model = create_model("blackbox", 2, in_channels=1, num_classes=3).eval()
    image = torch.randn(2, 1, 32, 32)
    output = model(image, explain=True)
    with torch.no_grad():
        features = model.forward_features(image)
        cam = torch.einsum("kc,bc...->bk...", model.classifier.weight, features).relu()
        expected = normalize_per_map(F.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False))
    torch.testing.assert_close(output.localization, expected, atol=1e-4, rtol=1e-3)


def test_normalize_keeps_high_values_high_and_zeroes_constant_maps() -> None:
    maps = torch.stack([torch.arange(4.0).view(1, 2, 2), torch.full((1, 2, 2), 3.0)])
    out = normalize_per_map(maps)
    torch.testing.assert_close(out[0].flatten(), torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]))
    assert out[1].abs().sum() == 0


def test_gradcam_works_with_a_frozen_backbone() -> None:
    model = create_model("blackbox", 2, in_channels=1, num_classes=2).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    output = model(torch.randn(1, 1, 32, 32), explain=True)
    assert output.localization.shape == (1, 2, 32, 32) and output.localization.max() == 1.0
    assert all(p.grad is None for p in model.parameters())
