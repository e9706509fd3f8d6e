"""Do a model's latent patches tell the phantom's lesion types apart? The ceiling of prototype purity.

Prototype purity (:class:`~pellucid.training.prototype_metrics.PrototypePurity`) asks whether the k images nearest to
a prototype show one lesion type (eight types: the three binary findings irregular, spiculated, calcified). A
prototype is a latent patch, so its purity can only be as high as the latent space separates the types. This script
measures that directly, with no prototype involved: for every test phantom with a lesion it takes the latent patch
(``forward_features``) on the feature cell the lesion covers most, and among the other lesions' patches finds the
k nearest (Euclidean); it prints per model

- ``same_type``: mean share of the k nearest with the same lesion type (what purity asks of a lesion prototype);
- ``same_class``: mean share with the same label (what the class-supervised objective asks);
- ``share_at_least_0.7``: share of lesion patches whose k nearest are at least 70 % of their own type;
- ``same_finding``: for each binary finding, mean share of the k nearest that agree with the patch on it (0.5 is
  what a latent space blind to the finding gives when half the lesions have it): which finding keeps types apart
  and which one mixes them.

With 10 normal prototypes of purity 1 out of 30, purity >= 0.80 needs the 20 lesion prototypes at ~0.70.

    python benchmarks/latent_type_separation.py protopnet_phantom2d cbm_phantom2d [path/to/last.ckpt ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from pellucid.models.pretrained import load_pretrained
from pellucid.models.prototype_losses import lesion_coverage
from pellucid.training.checkpoint import load_checkpoint
from pellucid.training.data import PhantomDataModule
from pellucid.training.data.phantom_rule import LESION_TYPE_NAMES

FINDINGS = ("irregular", "spiculated", "calcified")  # the words of the lesion type names


def load(source: str) -> nn.Module:
    """A zoo name, bundle folder or Lightning checkpoint -> the model in eval mode."""
    if source.endswith(".ckpt") and Path(source).is_file():
        return load_checkpoint(source).model.eval()
    return load_pretrained(source)[0]


@torch.no_grad()
def lesion_patches(model: nn.Module, data: PhantomDataModule, split: str = "test") -> tuple[Tensor, Tensor, Tensor]:
    """(N, D) latent patch on the best-covered cell of each lesion of ``split``, (N,) lesion types and (N,) labels.

    ``split="train"`` reads the training scans as generated (the data module's augmentation is off unless set).
    """
    if not hasattr(model, "forward_features"):
        raise TypeError(f"{type(model).__name__} has no forward_features (latent patches) to compare")
    vectors, types, labels = [], [], []
    for batch in getattr(data, f"{split}_dataloader")():
        features = model.forward_features(batch["image"])
        if not isinstance(features, Tensor):
            raise TypeError(f"{type(model).__name__}.forward_features returns {type(features).__name__}, "
                            "expected one (B, D, *s) tensor")
        best = lesion_coverage(batch["mask"], features.shape[2:]).flatten(1).argmax(dim=1)  # best-covered cell
        vectors.append(features.flatten(2)[torch.arange(len(best)), :, best])
        types.append(batch["lesion_type"])
        labels.append(batch["label"])
    vector, lesion_type, label = torch.cat(vectors), torch.cat(types), torch.cat(labels)
    keep = lesion_type > 0
    return vector[keep], lesion_type[keep], label[keep]


def separation(vectors: Tensor, types: Tensor, labels: Tensor, k: int) -> dict[str, float]:
    """Neighbourhood agreement of lesion types and labels among the k nearest other patches."""
    distances = torch.cdist(vectors.double(), vectors.double())
    distances.fill_diagonal_(float("inf"))
    nearest = distances.topk(k, dim=1, largest=False).indices
    same_type = (types[nearest] == types[:, None]).double().mean(dim=1)
    same_class = (labels[nearest] == labels[:, None]).double().mean(dim=1)
    findings = {name: torch.tensor([name in LESION_TYPE_NAMES[t].split() for t in range(len(LESION_TYPE_NAMES))])
                for name in FINDINGS}
    same_finding = {name: round((has[types[nearest]] == has[types][:, None]).double().mean().item(), 3)
                    for name, has in findings.items()}
    return {"lesions": len(types), "channels": vectors.shape[1], "same_type": round(same_type.mean().item(), 3),
            "same_class": round(same_class.mean().item(), 3),
            "share_at_least_0.7": round((same_type >= 0.7).double().mean().item(), 3), "same_finding": same_finding}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="zoo names, bundle folders or .ckpt files")
    parser.add_argument("--k", type=int, default=10, help="nearest patches (purity's k)")
    parser.add_argument("--num-test", type=int, default=1000, help="test phantoms (2D, seed 0, as the zoo's)")
    parser.add_argument("--split", choices=["test", "train"], default="test",
                        help="whose lesions: the test split, or the first --num-test training scans (fitting or "
                             "not generalising?)")
    args = parser.parse_args()
    data = PhantomDataModule(spatial_dims=2, seed=0, num_train=args.num_test, num_val=1, num_test=args.num_test,
                             batch_size=100)
    data.setup("fit" if args.split == "train" else "test")
    for source in args.models:
        result = separation(*lesion_patches(load(source), data, args.split), args.k)
        print(json.dumps({"model": source, "split": args.split, **result}))


if __name__ == "__main__":
    main()
