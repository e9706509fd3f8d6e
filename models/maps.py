"""Resizing explanation maps to the input resolution.

Linear and cubic interpolation are separable: resizing a (B, K, *s) map equals multiplying each spatial axis by a small
(s_i, S_i) weight matrix. On CPUs this is several times faster than ``F.interpolate`` (which spends most of its
time on index arithmetic for every output voxel) and gives the same values up to float rounding; the weight
matrices themselves come from ``F.interpolate`` applied to an identity, so the two cannot disagree on the
sampling convention (``align_corners=False``, edge clamping). Cubic resizing of 3D maps is the same separable
cubic convolution along each axis (``F.interpolate`` has no tricubic mode).

Why two modes: a linearly interpolated map is a convex combination of its samples, so its maximum always sits
(within half a pixel) on a feature cell's center; a structure smaller than a cell that lies between centers can
never hold the peak. Cubic convolution (Keys 1981, ``a = -0.75`` as in PyTorch and OpenCV) can peak between
samples, so the peak can follow the evidence below the cell size. ProtoPNet (Chen et al. 2019) upsamples its
activation maps this way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def linear_weights(size_in: int, size_out: int, device: torch.device | None = None) -> Tensor:
    """(size_in, size_out) float32 weights of 1D linear interpolation (``align_corners=False``), columns sum to 1."""
    identity = torch.eye(size_in, device=device, dtype=torch.float32).unsqueeze(0)  # (1, size_in, size_in)
    return F.interpolate(identity, size=size_out, mode="linear", align_corners=False)[0]


def cubic_weights(size_in: int, size_out: int, device: torch.device | None = None) -> Tensor:
    """(size_in, size_out) float32 weights of 1D cubic convolution (``align_corners=False``), columns sum to 1."""
    identity = torch.eye(size_in, device=device, dtype=torch.float32).view(1, size_in, size_in, 1)
    return F.interpolate(identity, size=(size_out, 1), mode="bicubic", align_corners=False)[0, :, :, 0]


INTERPOLATION_WEIGHTS = {"linear": linear_weights, "cubic": cubic_weights}


def check_interpolation(mode: str, name: str = "mode") -> str:
    """Return ``mode`` if it names an interpolation of :func:`resize_maps`, else raise naming ``name``."""
    if mode not in INTERPOLATION_WEIGHTS:
        raise ValueError(f"{name} must be one of {sorted(INTERPOLATION_WEIGHTS)}, got {mode!r}")
    return mode


def resize_maps(maps: Tensor, size: Sequence[int], mode: str = "linear") -> Tensor:
    """Resize (B, K, *s) maps to spatial ``size`` by separable linear or cubic interpolation, in float32.

    ``mode="linear"`` equals ``F.interpolate(maps.float(), size, mode="bilinear"/"trilinear",
    align_corners=False)``, ``mode="cubic"`` equals ``mode="bicubic"`` in 2D, up to float rounding. Cubic values
    can overshoot the samples' range slightly (negative lobes of the kernel). Explanation maps are always float32
    (also under bf16/fp16 autocast): they are normalised, written to disk and compared with masks, where half
    precision loses visible detail.

    Args:
        maps: (B, K, *s) tensor, 1 to 3 spatial axes.
        size: Target spatial size ``*S``.
        mode: ``"linear"`` or ``"cubic"``.

    Returns:
        (B, K, *S) float32 tensor; ``maps`` itself (as float32) if it already has that size.
    """
    size = tuple(int(n) for n in size)
    check_interpolation(mode, "resize_maps: mode")
    if len(size) != maps.ndim - 2:
        raise ValueError(f"resize_maps: {maps.ndim - 2} spatial axes in maps of shape {tuple(maps.shape)}, "
                         f"but size {size}")
    with torch.autocast(maps.device.type, enabled=False):
        resized = maps.float()
        for axis, (size_in, size_out) in enumerate(zip(maps.shape[2:], size, strict=True)):
            if size_in == size_out:
                continue
            dim = 2 + axis
            weights = INTERPOLATION_WEIGHTS[mode](size_in, size_out, maps.device)
            resized = (resized.movedim(dim, -1) @ weights).movedim(-1, dim)
        return resized.contiguous()


def upsample_evidence(maps: Tensor, size: Sequence[int], mode: str = "linear") -> Tensor:
    """:func:`resize_maps` for maps that are shown and scored: cubic values never fall below a map's smallest sample.

    The cubic kernel's negative lobes dig a trough beside a strong peak, below everything the map holds; scaled to
    [0, 1] per map, the trough becomes 0 and the whole background is lifted (on the 2D phantom the ProtoPNet
    evidence's energy inside the lesion fell from 0.57 to 0.17 without this floor, its pointing game unchanged). The
    peak keeps its overshoot: that is what places it between cell centers. Linear maps are returned unchanged.
    """
    resized = resize_maps(maps, size, mode)
    if mode != "cubic":
        return resized
    floor = maps.detach().float().flatten(2).amin(dim=2).view(*maps.shape[:2], *([1] * (maps.ndim - 2)))
    return torch.maximum(resized, floor)
