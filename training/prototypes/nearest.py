"""The k nearest training images of each prototype, streamed over the push loader (galleries, pruning, purity).

Memory stays flat in the dataset size: per prototype only the k best (distance, sample index) entries so far are
kept, and under DDP each process's lists are gathered and merged exactly as one process scanning in index order
would. Push itself (one nearest patch per prototype, projected) is :mod:`pellucid.training.prototypes.push`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from pellucid.models.prototypes import PrototypeNetwork
from pellucid.training.prototypes.push_data import Collective, batch_labels, on_lesion

NO_INDEX = torch.iinfo(torch.long).max  # sorts after every real sample index


@dataclass
class NearestPatches:
    """The k nearest training images of each prototype (each image counts once, by its closest patch).

    Attributes:
        distance: (P, k) distances, increasing; ``inf`` where fewer than k images exist.
        sample_index: (P, k) dataset indices (-1 where empty).
        feature_index: (P, k) flat feature-map location of the closest patch.
        label: (P, k) class index of the image.
        same_class: (P, k) whether the image belongs to the prototype's class.
        ids: ``ids[p][j]`` sample id of entry ``j`` of prototype ``p`` ("" where empty).
    """

    distance: Tensor
    sample_index: Tensor
    feature_index: Tensor
    label: Tensor
    same_class: Tensor
    ids: list[list[str]]


def _keep_nearest(k: int, distance: Tensor, index: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    """Per row, the k entries smallest in (distance, index) order, from (P, M) tensors."""
    by_index = torch.sort(index.masked_fill(index < 0, NO_INDEX), dim=1, stable=True).indices
    by_distance = torch.sort(distance.gather(1, by_index), dim=1, stable=True).indices
    order = by_index.gather(1, by_distance)[:, :k]
    return tuple(t.gather(1, order) for t in (distance, index, *others))


@torch.no_grad()
def find_nearest_patches(model: PrototypeNetwork, loader: DataLoader, k: int,
                         collective: Collective | None = None, own_class_only: bool = False,
                         within_mask: bool = False) -> NearestPatches:
    """Stream over the push loader keeping, per prototype, the k nearest images (memory flat in dataset size).

    Args:
        model: A prototype network in eval mode.
        loader: This process's shard (:func:`push_dataloader`).
        k: Images per prototype.
        collective: How to gather across processes (``None``: one process).
        own_class_only: Consider only images of each prototype's class (as push does).
        within_mask: Only lesion patches of images with a lesion (see :func:`push_prototypes`).
    """
    if k < 1:
        raise ValueError(f"find_nearest_patches: k must be >= 1, got {k}")
    collective = collective or Collective()
    layer = model.prototypes
    count, device = layer.num_prototypes, layer.vectors.device
    distance = torch.full((count, k), math.inf, device=device)
    index = torch.full((count, k), -1, dtype=torch.long, device=device)
    feature = torch.full((count, k), -1, dtype=torch.long, device=device)
    label = torch.full((count, k), -1, dtype=torch.long, device=device)
    same = torch.zeros((count, k), dtype=torch.long, device=device)
    ids: dict[int, str] = {}
    for batch in loader:
        candidates = model.push_candidates(batch["image"].to(device))
        distances = candidates.distances
        own = model.own_prototypes(batch["label"].to(device))  # (B, P)
        if own_class_only:
            distances = distances.masked_fill(~own.unsqueeze(2), math.inf)
        if within_mask:
            distances = distances.masked_fill(~on_lesion(batch, candidates, device), math.inf)
        location = distances.argmin(dim=2)  # (B, P)
        per_image = distances.gather(2, location.unsqueeze(2)).squeeze(2)
        if candidates.feature_index is not None:
            location = candidates.feature_index.gather(2, location.unsqueeze(2)).squeeze(2)
        size = per_image.shape[0]
        batch_index = batch["push_index"].to(device).view(1, size).expand(count, size)
        batch_label = batch_labels(batch).to(device).view(1, size).expand(count, size)
        batch_same = own.t().long()
        distance, index, feature, label, same = _keep_nearest(
            k, torch.cat([distance, per_image.t()], 1), torch.cat([index, batch_index], 1),
            torch.cat([feature, location.t()], 1), torch.cat([label, batch_label], 1), torch.cat([same, batch_same], 1))
        ids.update(zip(batch["push_index"].tolist(), batch["id"], strict=True))
        kept = set(index.flatten().tolist())
        ids = {i: name for i, name in ids.items() if i in kept}  # bounded by P * k entries

    gathered = [collective.all_gather(t) for t in (distance, index, feature, label, same)]  # (W, P, k) each
    merged = [torch.cat(list(t), dim=1) for t in gathered]  # (P, W * k)
    distance, index, feature, label, same = _keep_nearest(k, *merged)
    names: dict[int, str] = {}
    for part in collective.all_gather_object(ids):
        names.update(part)
    return NearestPatches(distance=distance, sample_index=index, feature_index=feature, label=label,
                          same_class=same.bool(), ids=[[names.get(i, "") for i in row] for row in index.tolist()])
