"""Resizing explanation maps to the input resolution.

Linear interpolation is separable: resizing a (B, K, *s) map equals multiplying each spatial axis by a small
(s_i, S_i) weight matrix. On CPUs this is several times faster than ``F.interpolate`` (which spends most of its
time on index arithmetic for every output voxel) and gives the same values up to float rounding; the weight
matrices themselves come from ``F.interpolate`` applied to an identity, so the two cannot disagree on the
sampling convention (``align_corners=False``, edge clamping).
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


def resize_maps(maps: Tensor, size: Sequence[int]) -> Tensor:
    """Resize (B, K, *s) maps to spatial ``size`` by (bi/tri)linear interpolation, in float32.

    Equal to ``F.interpolate(maps.float(), size, mode="bilinear"/"trilinear", align_corners=False)`` up to float
    rounding. Explanation maps are always float32 (also under bf16/fp16 autocast): they are normalised, written
    to disk and compared with masks, where half precision loses visible detail.

    Args:
        maps: (B, K, *s) tensor, 1 to 3 spatial axes.
        size: Target spatial size ``*S``.

    Returns:
        (B, K, *S) float32 tensor; ``maps`` itself (as float32) if it already has that size.
    """
    size = tuple(int(n) for n in size)
    if len(size) != maps.ndim - 2:
        raise ValueError(f"resize_maps: {maps.ndim - 2} spatial axes in maps of shape {tuple(maps.shape)}, "
                         f"but size {size}")
    with torch.autocast(maps.device.type, enabled=False):
        resized = maps.float()
        for axis, (size_in, size_out) in enumerate(zip(maps.shape[2:], size, strict=True)):
            if size_in == size_out:
                continue
            dim = 2 + axis
            weights = linear_weights(size_in, size_out, maps.device)
            resized = (resized.movedim(dim, -1) @ weights).movedim(-1, dim)
        return resized.contiguous()
