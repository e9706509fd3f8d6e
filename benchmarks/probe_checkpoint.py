"""Is a prototype network learning, collapsed, or looking away? Probe one checkpoint on phantom validation scans.

Prints one JSON line: accuracy and the count of each predicted class on the first ``--samples`` validation samples
of the phantom (data seed ``--data-seed``; a split's samples do not depend on the other splits' sizes, so this is
the validation data of any fit on that seed), the standard deviation over samples of each prototype's similarity,
averaged over prototypes (about 0 when the latent space has collapsed: every scan looks the same to every
prototype), and, on the samples with a lesion, the share of (sample, prototype) pairs whose map peaks on a feature
cell the lesion touches: the occurrence map for XProtoNet, the similarity map otherwise. This is how
``docs/benchmarks/diagnose_3d.md`` probed its stopped or off-target 3D runs:

    python benchmarks/probe_checkpoint.py <fit>/checkpoints/epoch=08.ckpt [--samples 200]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
import torch.nn.functional as F

from pellucid.training.data import PhantomDataModule
from pellucid.training.evaluate import load_module


def probe(ckpt: str, samples: int = 200, data_seed: int = 0, batch_size: int = 50) -> dict[str, Any]:
    """The numbers the module docstring describes, for the checkpoint (or bundle) ``ckpt``."""
    model = load_module(ckpt).model.eval()
    data = PhantomDataModule(spatial_dims=model.spatial_dims, seed=data_seed, num_train=1, num_val=samples,
                             num_test=1, batch_size=batch_size)
    data.setup("fit")
    predictions, labels, similarities, on_lesion = [], [], [], []
    with torch.no_grad():
        for batch in data.val_dataloader():
            output = model(batch["image"], explain=True)
            predictions.append(output.logits.argmax(dim=1))
            labels.append(batch["label"])
            if output.prototype_similarity is not None:
                similarities.append(output.prototype_similarity)
            maps = output.aux.get("occurrence_maps", output.prototype_maps)
            if maps is not None:
                # a cell "touches" the lesion when any of its input pixels does
                cells = F.adaptive_max_pool3d(batch["mask"].float(), maps.shape[2:]) if maps.ndim == 5 else \
                    F.adaptive_max_pool2d(batch["mask"].float(), maps.shape[2:])
                cells = cells[:, 0].flatten(1) > 0.5  # (B, cells)
                lesion = cells.any(dim=1)
                peaks = maps.flatten(2).argmax(dim=2)  # (B, P)
                on_lesion.append(torch.gather(cells, 1, peaks)[lesion].float().flatten())
    predicted, truth = torch.cat(predictions), torch.cat(labels)
    result: dict[str, Any] = {"checkpoint": ckpt, "samples": len(truth),
                              "accuracy": round(float((predicted == truth).float().mean()), 4),
                              "predicted_counts": torch.bincount(predicted, minlength=model.num_classes).tolist()}
    if similarities:
        result["similarity_sd_over_samples"] = round(float(torch.cat(similarities).std(dim=0).mean()), 5)
    if on_lesion:
        result["map_peak_on_lesion"] = round(float(torch.cat(on_lesion).mean()), 4)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", help="a Lightning checkpoint of a fit, a bundle folder or a zoo name")
    parser.add_argument("--samples", type=int, default=200, help="validation samples to probe")
    parser.add_argument("--data-seed", type=int, default=0, help="phantom seed of the data")
    args = parser.parse_args(argv)
    print(json.dumps(probe(args.ckpt, args.samples, args.data_seed)))


if __name__ == "__main__":
    main()
