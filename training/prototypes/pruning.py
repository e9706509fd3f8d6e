"""Prototype pruning: drop duplicate prototypes and prototypes whose nearest training patches are of other classes.

Chen et al., NeurIPS 2019, section 2.5 ("prototype pruning"): a prototype whose k nearest training patches hold
fewer than ``min_same_class`` from its own class is not class-specific and is removed. Prototypes whose source
patch (after push) is the same as another's are duplicates: the later ones are removed and their last-layer
weights are added to the one kept, so the logits do not change.

Removal is a mask, not a reshape: a pruned prototype keeps its slot (parameter shapes, checkpoint layout and
provenance indices stay stable), its ``active`` flag is cleared, its last-layer column is zeroed, and the model
gives it similarity 0 everywhere. Enable it as a config option of the push callback::

    - class_path: pellucid.training.prototypes.push.PrototypePush
      init_args:
        phases: [last_layer]
        pruning:
          class_path: pellucid.training.prototypes.pruning.PrototypePruning
          init_args: {k: 6, min_same_class: 3}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pellucid.models.prototypes import PrototypeNetwork

if TYPE_CHECKING:  # push imports this module; the type is only needed for annotations
    from pellucid.training.prototypes.nearest import NearestPatches


@dataclass
class PruningReport:
    """What pruning removed.

    Attributes:
        duplicates: ``(removed, kept)`` pairs; the removed prototype's weights went to the kept one.
        impure: Prototypes removed because too few of their nearest patches were of their class.
        active: Prototypes still active afterwards.
    """

    duplicates: list[tuple[int, int]] = field(default_factory=list)
    impure: list[int] = field(default_factory=list)
    active: int = 0


class PrototypePruning:
    """Options of prototype pruning, and :meth:`apply`.

    Args:
        k: Nearest training images (each counted once, by its closest patch) to inspect per prototype.
        min_same_class: A prototype with fewer of its class among the k is removed (ProtoPNet: k=6, 3).
        remove_duplicates: Remove prototypes whose source patch duplicates another's, merging their weights.
        duplicate_tolerance: Largest latent distance (L2 norm of the difference) at which two prototypes with the
            same source patch count as duplicates.
    """

    def __init__(self, k: int = 6, min_same_class: int = 3, remove_duplicates: bool = True,
                 duplicate_tolerance: float = 1e-6) -> None:
        if k < 1:
            raise ValueError(f"PrototypePruning: k must be >= 1, got {k}")
        if not 0 <= min_same_class <= k:
            raise ValueError(f"PrototypePruning: min_same_class must be in [0, k={k}], got {min_same_class}")
        self.k, self.min_same_class = k, min_same_class
        self.remove_duplicates, self.duplicate_tolerance = remove_duplicates, duplicate_tolerance

    @torch.no_grad()
    def apply(self, model: PrototypeNetwork, nearest: NearestPatches) -> PruningReport:
        """Prune ``model`` in place using its provenance and the k nearest patches of each prototype.

        A class never loses its last active prototype (it would have no evidence left).
        """
        layer = model.prototypes
        if nearest.distance.shape != (layer.num_prototypes, self.k):
            raise ValueError(f"PrototypePruning.apply: expected nearest patches of shape "
                             f"{(layer.num_prototypes, self.k)}, got {tuple(nearest.distance.shape)}")
        report = PruningReport()
        if self.remove_duplicates:
            report.duplicates = self._merge_duplicates(model)
        same_class = nearest.same_class.sum(dim=1).tolist()
        classes = layer.prototype_classes.tolist()
        for prototype in range(layer.num_prototypes):
            if not bool(layer.active[prototype]) or same_class[prototype] >= self.min_same_class:
                continue
            others = [p for p in range(layer.num_prototypes)
                      if p != prototype and classes[p] == classes[prototype] and bool(layer.active[p])]
            if not others:
                continue
            self._remove(model, prototype, f"impure: {same_class[prototype]} of its {self.k} nearest images "
                                           f"are of its class (< {self.min_same_class})")
            report.impure.append(prototype)
        report.active = int(layer.active.sum())
        return report

    def _merge_duplicates(self, model: PrototypeNetwork) -> list[tuple[int, int]]:
        layer, merged = model.prototypes, []
        first_by_patch: dict[tuple[int, tuple[int, ...]], int] = {}
        for prototype, source in enumerate(layer.sources):
            if source is None or not bool(layer.active[prototype]):
                continue
            patch = (source.sample_index, tuple(source.feature_index))
            kept = first_by_patch.get(patch)
            gap = None if kept is None else float((layer.vectors[prototype] - layer.vectors[kept]).norm())
            if gap is None or gap > self.duplicate_tolerance:
                first_by_patch.setdefault(patch, prototype)
                continue
            model.last_layer.weight[:, kept] += model.last_layer.weight[:, prototype]
            self._remove(model, prototype, f"duplicate of prototype {kept}")
            merged.append((prototype, kept))
        return merged

    @staticmethod
    def _remove(model: PrototypeNetwork, prototype: int, reason: str) -> None:
        layer = model.prototypes
        layer.active[prototype] = False
        model.last_layer.weight[:, prototype] = 0.0
        if layer.sources[prototype] is not None:
            layer.sources[prototype].pruned = reason
