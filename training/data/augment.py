"""Label-preserving training augmentation: random flips and 90-degree rotations, reproducible per epoch and batch.

Flips and quarter turns change no finding's size, shape class or intensity, so they keep every label, concept and
lesion type of the phantom (and of most lesion-level tasks), while a network can no longer memorise orientation.
Each sample of a batch gets its own flips and turns (torch's ``flip`` and ``rot90``; MONAI's ``RandFlipd`` and
``RandRotate90d`` do the same per dictionary but cost about 100 ms per batch of 64 on a 2-core CPU, seconds an epoch),
drawn from a generator seeded by ``(seed, epoch, batch index, rank)``. The draws happen in the main process after
the batch is collated (a data module calls :meth:`BatchAugmentation.__call__` from Lightning's
``on_after_batch_transfer`` hook, during training only), so a run reproduces them whatever the number of workers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

SPATIAL_KEYS: tuple[str, ...] = ("image", "mask", "confounder_mask")


def square_planes(image_size: Sequence[int], spacing: Sequence[float] | None = None) -> list[tuple[int, int]]:
    """Pairs of spatial axes a quarter turn maps onto themselves: same voxel count and, if given, same spacing.

    Args:
        image_size: Voxels per spatial axis.
        spacing: Voxel size per spatial axis (a turn between axes of different spacing would distort anatomy).
    """
    axes = range(len(image_size))
    return [
        (a, b) for a in axes for b in axes
        if a < b and image_size[a] == image_size[b] and (spacing is None or spacing[a] == spacing[b])
    ]


class BatchAugmentation:
    """Random flips along every spatial axis and quarter turns in the given planes, drawn per sample.

    Args:
        spatial_dims: 2 or 3.
        planes: Pairs of spatial axes (0-based, channel excluded) to rotate in; ``[]`` for flips only.
        keys: Batch keys holding (B, C, *S) tensors to transform alike; missing keys are skipped.
        seed: Base seed of the random state.
    """

    def __init__(
        self,
        spatial_dims: int,
        planes: Sequence[tuple[int, int]] = ((0, 1),),
        keys: Sequence[str] = SPATIAL_KEYS,
        seed: int = 0,
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        for plane in planes:
            if len(plane) != 2 or plane[0] == plane[1] or not all(0 <= a < spatial_dims for a in plane):
                raise ValueError(f"planes: each must be two different axes in 0..{spatial_dims - 1}, got {plane!r}")
        self.spatial_dims, self.keys, self.seed = spatial_dims, tuple(keys), int(seed)
        self.planes = [tuple(plane) for plane in planes]

    def orbit(self, region: Tensor) -> Tensor:
        """Every place ``region`` can land under the flips and turns this augmentation draws (their union).

        Args:
            region: (*S) boolean mask.

        Returns:
            (*S) boolean mask: ``region`` or-ed with its image under every composition of flips and turns.
        """
        if region.dim() != self.spatial_dims:
            raise ValueError(f"orbit: region must have {self.spatial_dims} spatial axes, got {tuple(region.shape)}")
        moves = [lambda r, a=a: r.flip(a) for a in range(self.spatial_dims)]
        moves += [lambda r, p=p: torch.rot90(r, 1, p) for p in self.planes]
        found, frontier = region.clone(), [region]
        seen = {region.numpy().tobytes()}
        while frontier:
            current = frontier.pop()
            for move in moves:
                moved = move(current)
                key = moved.numpy().tobytes()
                if key not in seen:
                    seen.add(key)
                    frontier.append(moved)
                    found |= moved
        return found

    def __call__(self, batch: Mapping[str, Any], epoch: int, batch_index: int, rank: int = 0) -> dict[str, Any]:
        """Return a copy of ``batch`` with its spatial keys flipped and turned per sample.

        Args:
            batch: A collated batch (pellucid batch convention).
            epoch: Training epoch; with ``batch_index`` and ``rank`` it seeds the draws.
            batch_index: Index of the batch within the epoch.
            rank: Process rank under DDP (each process draws its own augmentations).

        Raises:
            ValueError: naming the key when a spatial tensor is not (B, C, *S) with the batch's size.
        """
        present = [key for key in self.keys if isinstance(batch.get(key), Tensor)]
        if not present:
            return dict(batch)
        size = batch[present[0]].shape[0]
        for key in present:
            shape = tuple(batch[key].shape)
            if len(shape) != self.spatial_dims + 2 or shape[0] != size:
                raise ValueError(f"augmentation: batch[{key!r}] must be (B={size}, C, *S) with {self.spatial_dims} "
                                 f"spatial axes, got shape {shape}")
        generator = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, batch_index, rank]))
        flips = generator.random((size, self.spatial_dims)) < 0.5  # per sample and axis
        turns = generator.integers(0, 4, size=(size, len(self.planes)))  # quarter turns per sample and plane
        augmented = dict(batch)
        for key in present:
            samples = []
            for index in range(size):
                value = batch[key][index]  # (C, *S): spatial axis a is tensor dim a + 1
                axes = [axis + 1 for axis in np.flatnonzero(flips[index]).tolist()]
                value = value.flip(axes) if axes else value
                for (first, second), k in zip(self.planes, turns[index].tolist(), strict=True):
                    value = torch.rot90(value, k, (first + 1, second + 1)) if k else value
                samples.append(value)
            augmented[key] = torch.stack(samples).contiguous()
        return augmented
