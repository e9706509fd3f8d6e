"""Grad-CAM of the black-box baseline equals the class activation map it must reduce to."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.visualize import GradCAM

from pellucid.models import create_model
from pellucid.models.gradcam import grad_cam, normalize_per_map, normalize_per_map_


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
    model.localization_interpolation = "cubic"
    cubic = F.interpolate(cam, size=(32, 32), mode="bicubic", align_corners=False)
    expected = normalize_per_map(torch.maximum(cubic, cam.flatten(2).amin(2)[..., None, None]))
    torch.testing.assert_close(model(image, explain=True).localization, expected, atol=1e-4, rtol=1e-3)
    with pytest.raises(ValueError, match="blackbox: localization_interpolation must be one of"):
        create_model("blackbox", 2, localization_interpolation="spline")


def test_normalize_keeps_high_values_high_and_zeroes_constant_maps() -> None:
    maps = torch.stack([torch.arange(4.0).view(1, 2, 2), torch.full((1, 2, 2), 3.0)])
    out = normalize_per_map(maps)
    torch.testing.assert_close(out[0].flatten(), torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]))
    assert out[1].abs().sum() == 0
    random = torch.randn(3, 2, 5, 4)
    expected = normalize_per_map(random)
    assert normalize_per_map_(random) is random and torch.equal(random, expected)  # in place, same bits


def test_gradcam_works_with_a_frozen_backbone() -> None:
    model = create_model("blackbox", 2, in_channels=1, num_classes=2).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    output = model(torch.randn(1, 1, 32, 32), explain=True)
    assert output.localization.shape == (1, 2, 32, 32) and output.localization.max() == 1.0
    assert all(p.grad is None for p in model.parameters())


class _Logits(torch.nn.Module):
    """The black box as ``image -> logits``, with its feature map reachable by name for MONAI's hooks."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(image))


def test_gradcam_equals_monai_gradcam_in_eval_mode() -> None:
    # one forward + a backward through the head per class must give MONAI's forward + full backward per class
    torch.manual_seed(0)
    model = create_model("blackbox", 2, in_channels=1, num_classes=3, pooling="max").eval()
    image = torch.randn(2, 1, 32, 32)
    with torch.inference_mode():
        localization = model(image, explain=True).localization
    # MONAI leaves its hooks on the target layer, so it runs last
    cam = GradCAM(nn_module=_Logits(model), target_layers="model.feature_map", postprocessing=normalize_per_map)
    expected = torch.cat([cam(image, class_idx=k) for k in range(3)], dim=1).detach()
    torch.testing.assert_close(localization, expected, atol=1e-5, rtol=1e-4)


def test_gradcam_in_training_touches_no_gradient_and_runs_the_backbone_once() -> None:
    torch.manual_seed(0)
    model = create_model("blackbox", 2, in_channels=1, num_classes=3).train()
    model(torch.randn(4, 1, 32, 32), explain=True)
    assert all(p.grad is None for p in model.parameters())
    counters = [b for name, b in model.named_buffers() if name.endswith("num_batches_tracked")]
    assert counters and all(int(c) == 1 for c in counters)  # batch statistics updated by one forward, not 1 + K


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_closed_form_gradcam_of_the_average_pooled_head_equals_autograd_and_monai(spatial_dims, monkeypatch) -> None:
    # avg pooling + linear: Grad-CAM's channel weights are W / N, computed without any backward pass
    torch.manual_seed(0)
    model = create_model("blackbox", spatial_dims, in_channels=1, num_classes=3).eval()
    image = torch.randn(2, 1, *[32 if spatial_dims == 2 else 16] * spatial_dims)
    with torch.no_grad():
        features = model.forward_features(image)
    autograd_maps = grad_cam(model.forward_head, features, image.shape[2:], 3)

    def no_backward(*args, **kwargs):
        raise AssertionError("the average-pooled head's Grad-CAM ran a backward pass")

    with monkeypatch.context() as patch:
        patch.setattr(torch.autograd, "grad", no_backward)
        with torch.inference_mode():
            localization = model(image, explain=True).localization
    assert localization.shape == (2, 3, *image.shape[2:]) and float(localization.amax()) == 1.0
    torch.testing.assert_close(localization, autograd_maps, atol=1e-5, rtol=0)
    cam = GradCAM(nn_module=_Logits(model), target_layers="model.feature_map", postprocessing=normalize_per_map)
    expected = torch.cat([cam(image, class_idx=k) for k in range(3)], dim=1).detach()
    torch.testing.assert_close(localization, expected, atol=1e-5, rtol=0)


def test_max_pooling_and_training_dropout_keep_the_backward_pass(monkeypatch) -> None:
    calls = []
    original = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or original(*a, **k))
    image = torch.randn(2, 1, 32, 32)
    create_model("blackbox", 2, num_classes=2, pooling="max").eval()(image, explain=True)
    assert len(calls) == 2  # one backward through the head per class
    create_model("blackbox", 2, num_classes=2, dropout=0.5).train()(image, explain=True)
    assert len(calls) == 4
    create_model("blackbox", 2, num_classes=2, dropout=0.5).eval()(image, explain=True)
    assert len(calls) == 4  # dropout is the identity in eval mode: closed form
