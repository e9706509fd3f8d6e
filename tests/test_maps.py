"""Separable map resizing equals ``F.interpolate`` and always returns float32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pellucid.models.maps import resize_maps, upsample_evidence


@pytest.mark.parametrize(("shape", "size"), [((2, 3, 8, 8), (64, 64)), ((2, 1, 9, 7), (37, 29)),
                                             ((1, 2, 5, 6, 7), (19, 13, 17)), ((1, 2, 4, 16), (8, 8)),
                                             ((2, 3, 6), (11,))])
def test_resize_maps_equals_linear_interpolation(shape: tuple[int, ...], size: tuple[int, ...]) -> None:
    maps = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    expected = F.interpolate(maps, size=size, mode=mode, align_corners=False)
    torch.testing.assert_close(resize_maps(maps, size), expected, atol=2e-6, rtol=1e-5)


def test_resize_maps_is_float32_under_bf16_autocast_and_keeps_gradients() -> None:
    maps = torch.rand(2, 3, 4, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        resized = resize_maps(maps.to(torch.bfloat16), (16, 16))
    assert resized.dtype == torch.float32 and resized.shape == (2, 3, 16, 16)
    resized.sum().backward()
    torch.testing.assert_close(maps.grad, torch.full_like(maps, 16.0))  # each source value spreads weight 16


def test_resize_maps_names_a_size_of_the_wrong_rank() -> None:
    with pytest.raises(ValueError, match=r"2 spatial axes in maps of shape \(1, 1, 4, 4\), but size \(8, 8, 8\)"):
        resize_maps(torch.zeros(1, 1, 4, 4), (8, 8, 8))


@pytest.mark.parametrize(("shape", "size"),
                         [((2, 3, 8, 8), (64, 64)), ((2, 1, 9, 7), (37, 29)), ((1, 2, 4, 16), (8, 8))])
def test_cubic_resize_equals_bicubic_interpolation(shape: tuple[int, ...], size: tuple[int, ...]) -> None:
    maps = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(maps, size=size, mode="bicubic", align_corners=False)
    torch.testing.assert_close(resize_maps(maps, size, "cubic"), expected, atol=2e-6, rtol=1e-5)


def test_cubic_resize_in_3d_is_bicubic_per_slice_then_cubic_along_depth() -> None:
    maps = torch.randn(1, 2, 4, 5, 6, generator=torch.Generator().manual_seed(1))
    in_plane = torch.stack([F.interpolate(maps[:, :, d], size=(10, 12), mode="bicubic", align_corners=False)
                            for d in range(4)], dim=2)  # (1, 2, 4, 10, 12)
    along_depth = F.interpolate(in_plane.permute(0, 1, 3, 2, 4).reshape(1, 20, 4, 12), size=(8, 12), mode="bicubic",
                                align_corners=False)  # width unchanged: bicubic along depth only
    expected = along_depth.reshape(1, 2, 10, 8, 12).permute(0, 1, 3, 2, 4)
    torch.testing.assert_close(resize_maps(maps, (8, 10, 12), "cubic"), expected, atol=2e-6, rtol=1e-5)


def test_resize_maps_names_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match=r"mode must be one of \['cubic', 'linear'\], got 'nearest'"):
        resize_maps(torch.zeros(1, 1, 4, 4), (8, 8), "nearest")


def test_upsampled_evidence_keeps_the_cubic_peak_but_digs_no_trough_below_the_samples() -> None:
    maps = torch.zeros(1, 1, 6, 6)
    maps[0, 0, 2, 2] = 5.0  # a strong peak on a flat background: the cubic kernel undershoots beside it
    plain = resize_maps(maps, (24, 24), "cubic")
    shown = upsample_evidence(maps, (24, 24), "cubic")
    assert float(plain.min()) < -0.1 and float(shown.min()) == 0.0  # the floor is the smallest sample
    assert float(shown.max()) == float(plain.max()) and int(shown.argmax()) == int(plain.argmax())
    torch.testing.assert_close(upsample_evidence(maps, (24, 24)), resize_maps(maps, (24, 24)))  # linear: as is
