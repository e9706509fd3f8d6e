"""How well can a feature-resolution map point at the phantom's lesions at all? The ceiling of the pointing game.

A model's ``localization`` is a map at feature resolution (one value per cell of the latent grid) upsampled to the
image. The pointing game asks whether the map's maximum lies on the lesion. This script scores the best map a model
could produce at a given stride, with no model involved: each cell's value is the share of its pixels on the lesion
(``lesion_coverage``, the cell-level truth), upsampled by each interpolation of
:func:`pellucid.models.maps.resize_maps`. A linearly upsampled map is a convex combination of its cells, so its
maximum sits on a cell center; a lesion smaller than a cell that lies between centers cannot hold it, whatever the
model. Cubic convolution can peak between centers.

Prints one JSON line per stride: the pointing game of the ideal cell map under each interpolation, over the test
split's scans with a lesion (2D phantom, 1,000 scans, seed 0 unless told otherwise).

    python benchmarks/upsampling_ceiling.py [--strides 8 4] [--num-test 1000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json

import torch

from pellucid.models.maps import INTERPOLATION_WEIGHTS, resize_maps
from pellucid.models.prototype_losses import lesion_coverage
from pellucid.training.data import PhantomDataModule
from pellucid.training.localization import PointingGame


def ceiling(masks: torch.Tensor, stride: int) -> dict[str, float]:
    """Pointing game of the ideal cell map (lesion share per cell) at ``stride``, per interpolation.

    Args:
        masks: (N, 1, *S) lesion masks; every axis of ``S`` divisible by ``stride``.
        stride: Cell size in pixels/voxels along each axis.
    """
    size = tuple(masks.shape[2:])
    if any(n % stride for n in size):
        raise ValueError(f"upsampling_ceiling: image size {size} is not divisible by stride {stride}")
    cells = lesion_coverage(masks, tuple(n // stride for n in size)).unsqueeze(1)
    scores = {}
    for mode in sorted(INTERPOLATION_WEIGHTS):
        pointing = PointingGame()
        pointing.update(resize_maps(cells, size, mode), masks)
        scores[mode] = round(float(pointing.compute()), 4)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strides", type=int, nargs="+", default=[8, 4], help="cell sizes to score")
    parser.add_argument("--num-test", type=int, default=1000, help="test scans to generate")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (the configs use 0)")
    parser.add_argument("--spatial-dims", type=int, default=2, choices=[2, 3])
    arguments = parser.parse_args()
    data = PhantomDataModule(spatial_dims=arguments.spatial_dims, seed=arguments.seed, num_train=1, num_val=1,
                             num_test=arguments.num_test, batch_size=200)
    data.setup("test")
    masks = torch.cat([batch["mask"] for batch in data.test_dataloader()])
    with_lesion = int((masks.flatten(1).amax(dim=1) > 0.5).sum())
    for stride in arguments.strides:
        print(json.dumps({"stride": stride, "scans_with_lesion": with_lesion,
                          "pointing_game_of_ideal_cell_map": ceiling(masks, stride)}))


if __name__ == "__main__":
    main()
