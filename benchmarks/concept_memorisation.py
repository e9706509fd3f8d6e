"""Can a small encoder learn the phantom's binary findings from 4,000 scans, or does it memorise them?

A diagnostic, not a model of the zoo: the residual encoder of the concept configs (``monai/convnet``, 32-64-128
channels) plus a 1x1 convolution and mean pooling is trained on the three binary concepts alone (irregular,
spiculated, calcified; BCE, AdamW 3e-3 one-cycle, batch 64) over the first 4,000 training phantoms, and after every
epoch it prints the validation accuracy of each concept (1,000 validation phantoms), the training accuracy on the
first 1,000 training phantoms, and the validation accuracy of ``irregular`` by lesion diameter (4-8, 8-12, 12-16,
16-20 mm). ``--mode none`` shows the encoder memorising ``irregular`` (training accuracy near 1.0, validation near
0.8, even on lesions of 16-20 mm whose lobes are many voxels wide); ``--mode augment`` flips and turns every training
batch per sample with the same :class:`~pellucid.training.data.augment.BatchAugmentation` that
``PhantomDataModule(augment=True)`` applies.

    python benchmarks/concept_memorisation.py --mode none --epochs 20
    python benchmarks/concept_memorisation.py --mode augment --epochs 30
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from pellucid.models.backbones import create_backbone
from pellucid.training.data.augment import BatchAugmentation, square_planes
from pellucid.training.data.phantom import PhantomGenerator

DIAMETER_BINS_MM = ((4, 8), (8, 12), (12, 16), (16, 21))


def load(generator: PhantomGenerator, split: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 64, 64) and concepts (N, 5) of the first ``count`` samples of ``split``."""
    samples = [generator.sample(split, i) for i in range(count)]
    return torch.tensor(np.stack([s.image for s in samples])), torch.tensor(np.stack([s.concepts for s in samples]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["none", "augment"], default="none", help="training-batch augmentation")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    arguments = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(arguments.threads)
    generator = PhantomGenerator(seed=0)
    augment = BatchAugmentation(2, square_planes((64, 64))) if arguments.mode == "augment" else None
    start = time.time()
    train_x, train_c = load(generator, "train", 4000)
    val_x, val_c = load(generator, "val", 1000)
    encoder = create_backbone("monai/convnet", 2, 1, channels=[32, 64, 128], strides=[2, 2, 2])
    head = torch.nn.Conv2d(encoder.out_channels, 3, 1)
    optimizer = torch.optim.AdamW(list(encoder.parameters()) + list(head.parameters()), lr=3e-3, weight_decay=1e-4)
    steps = arguments.epochs * (4000 // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=steps, pct_start=0.05)

    def logits(x: torch.Tensor) -> torch.Tensor:
        return head(encoder(x)).flatten(2).mean(2)

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([logits(x[i:i + 250]) for i in range(0, len(x), 250)]) > 0

    for epoch in range(arguments.epochs):
        encoder.train()
        order = torch.randperm(4000)
        for i in range(0, 4000 - 63, 64):
            index = order[i:i + 64]
            x, y = train_x[index], train_c[index][:, 2:5]
            if augment is not None:  # what PhantomDataModule(augment=True) applies to every training batch
                x = augment({"image": x}, epoch, i // 64)["image"]
            loss = F.binary_cross_entropy_with_logits(logits(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        encoder.eval()
        correct = (predict(val_x) == (val_c[:, 2:5] > 0.5)).float()
        train_correct = (predict(train_x[:1000]) == (train_c[:1000, 2:5] > 0.5)).float()
        diameter = val_c[:, 0]
        by_diameter = {f"{a}-{b}": round(correct[(diameter >= a) & (diameter < b), 0].mean().item(), 3)
                       for a, b in DIAMETER_BINS_MM}
        print(json.dumps({"epoch": epoch, "seconds": round(time.time() - start),
                          "val": dict(zip(("irregular", "spiculated", "calcified"),
                                          [round(v, 3) for v in correct.mean(0).tolist()], strict=True)),
                          "train": dict(zip(("irregular", "spiculated", "calcified"),
                                            [round(v, 3) for v in train_correct.mean(0).tolist()], strict=True)),
                          "val_irregular_by_diameter_mm": by_diameter}), flush=True)


if __name__ == "__main__":
    main()
