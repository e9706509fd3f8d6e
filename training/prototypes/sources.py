"""Prototype sources without push: the training patch where each prototype is most present, prototypes unchanged.

ProtoPNet's push replaces every prototype by a training patch, so the patch *is* the prototype. Models whose
prototypes are not latent vectors (PIP-Net: a prototype is a channel of softmax presence maps) cannot be projected;
what a user still needs is where each prototype is most present in the training data, with the same provenance
(sample, label, latent cell, its footprint in the image). :func:`find_prototype_sources` finds it with one streaming
pass over the push loader, reading only the model's ``prototype_maps`` (the output contract), and
:class:`~pellucid.training.prototypes.push.PrototypePush` hands the result to the model's
``record_prototype_sources`` (explanation protocol) when a recipe phase marked ``push`` starts. Under DDP the winners
are chosen as one process scanning in index order would.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from pellucid.models import InterpretableModel
from pellucid.models.prototypes import PrototypeSource
from pellucid.training.prototypes.distinct import CandidateLists, assign_distinct
from pellucid.training.prototypes.push import PushReport, _source, _winners
from pellucid.training.prototypes.push_data import Collective, batch_labels

_FIRST_K = 8  # candidates kept per prototype in the first pass of a distinct search


@dataclass
class SourcesReport(PushReport):
    """What :func:`find_prototype_sources` found: push's report and the model's logits on the training data.

    Attributes:
        logits: (N, K) eval-mode logits of every training image, in index order over every process (for the model's
            abstention thresholds, :meth:`~pellucid.models.InterpretableModel.calibrate_abstention`).
    """

    logits: Tensor = field(default_factory=lambda: torch.empty(0))


def keeps_prototype_sources(model: object) -> bool:
    """Whether ``model`` implements the protocol's ``record_prototype_sources`` (it keeps found sources)."""
    return isinstance(model, InterpretableModel) and \
        type(model).record_prototype_sources is not InterpretableModel.record_prototype_sources


@torch.no_grad()
def find_prototype_sources(model: InterpretableModel, loader: DataLoader, collective: Collective | None = None,
                           epoch: int = -1, unique_sources: bool = True) -> SourcesReport:
    """For every prototype, the latent patch of a training image where its ``prototype_maps`` value is largest.

    The model is not changed. A prototype's value is compared over every latent cell of every image; ties go to the
    lowest sample index, then the lowest cell (row-major). A prototype whose map is never above 0 (PIP-Net: one that
    carries no weight, or is never present above its threshold) gets no source. The provenance's ``distance`` is
    ``1 - value`` (for presences in [0, 1]: how far from fully present). With ``unique_sources`` no two prototypes
    are shown with one patch: where several peak on the same patch, the most present keeps it and the others take
    their next patch not taken (greedy by value, :mod:`pellucid.training.prototypes.distinct`).

    Args:
        model: A model whose output has ``prototype_maps`` (put it in eval mode first).
        loader: This process's shard, in increasing index order, items tagged ``push_index``
            (:func:`~pellucid.training.prototypes.push_data.push_dataloader`).
        collective: How to gather across processes (``None``: one process).
        epoch: Stored in the provenance.
        unique_sources: A distinct source patch (image and latent cell) per prototype.

    Returns:
        The report: ``sources`` (one entry or ``None`` per prototype) and the logits of every image.

    Raises:
        ValueError: when the model has no prototypes (``prototype_provenance()``) or its output has no
            ``prototype_maps`` with one channel per prototype.
    """
    collective = collective or Collective()
    start = time.perf_counter()
    device = next(model.parameters()).device
    count = len(model.prototype_provenance() or [])
    if count == 0:
        raise ValueError(f"find_prototype_sources: {model.name} has no prototypes (prototype_provenance() is empty "
                         "or None)")
    if unique_sources:
        return _distinct_sources(model, loader, collective, epoch, count, start)
    best_value = torch.full((count,), -math.inf, device=device)
    best_index = torch.full((count,), -1, dtype=torch.long, device=device)
    best_feature = torch.zeros(count, dtype=torch.long, device=device)
    best_label = torch.full((count,), -1, dtype=torch.long, device=device)
    best_id = [""] * count
    sizes: dict[int, tuple[list[int], list[int]]] = {}
    prototypes = torch.arange(count, device=device)
    seen, logits, indices = 0, [], []
    for batch in loader:
        images = batch["image"].to(device)
        maps = _maps_and_logits(model, images, count, batch, logits, indices)
        flat = maps.detach().float().flatten(2)  # (B, P, N)
        location = flat.argmax(dim=2)  # first maximum: the lowest cell wins ties
        per_image = flat.gather(2, location.unsqueeze(2)).squeeze(2)  # (B, P)
        winner = per_image.argmax(dim=0)  # first maximum: the lowest sample index wins ties
        candidate = per_image[winner, prototypes]
        improved = ((candidate > best_value) & (candidate > 0)).nonzero().flatten()  # strict: earlier samples win
        seen += images.shape[0]
        if improved.numel() == 0:
            continue
        rows = winner[improved]
        best_value[improved] = candidate[improved]
        best_feature[improved] = location[rows, improved]
        best_index[improved] = batch["push_index"].to(device)[rows]
        best_label[improved] = batch_labels(batch).to(device)[rows]
        for prototype, row in zip(improved.tolist(), rows.tolist(), strict=True):
            best_id[prototype] = batch["id"][row]
            sizes[prototype] = (list(maps.shape[2:]), list(images.shape[2:]))
    winner, all_distance, all_index = _winners(-best_value, best_index, collective)  # largest value, smallest -value
    features = collective.all_gather(best_feature)[winner, prototypes].tolist()
    labels = collective.all_gather(best_label)[winner, prototypes].tolist()
    values = (-all_distance[winner, prototypes]).tolist()
    index = all_index[winner, prototypes].tolist()
    everything = collective.all_gather_object((best_id, sizes))
    sources: list[PrototypeSource | None] = []
    for p, rank in enumerate(winner.tolist()):
        if not math.isfinite(values[p]):
            sources.append(None)
            continue
        ids, rank_sizes = everything[rank]
        feature_size, image_size = rank_sizes[p]
        sources.append(_source(ids[p], index[p], labels[p], features[p], feature_size, image_size, 1.0 - values[p],
                               epoch))
    return SourcesReport(sources=sources, seconds=time.perf_counter() - start, num_samples=seen,
                         logits=_gathered_logits(collective, logits, indices))


def _maps_and_logits(model: InterpretableModel, images: Tensor, count: int, batch: dict[str, Any],
                     logits: list[Tensor], indices: list[Tensor]) -> Tensor:
    """(B, P, *s) ``prototype_maps`` of ``images``; their logits and sample indices are appended to the lists."""
    output = model(images, explain=False)
    maps = output.prototype_maps if output.prototype_maps is not None else model(images).prototype_maps
    if output.logits is not None:
        logits.append(output.logits.detach().float().cpu())
        indices.append(batch["push_index"].cpu())
    if maps is None or maps.shape[1] != count:
        found = "no prototype_maps" if maps is None else f"prototype_maps of shape {tuple(maps.shape)}"
        raise ValueError(f"find_prototype_sources: {model.name} has {count} prototypes but returns {found}")
    return maps


def _gathered_logits(collective: Collective, logits: list[Tensor], indices: list[Tensor]) -> Tensor:
    return _in_index_order(collective.all_gather_object((torch.cat(indices), torch.cat(logits)) if logits else None))


def _distinct_sources(model: InterpretableModel, loader: DataLoader, collective: Collective, epoch: int, count: int,
                      start: float) -> SourcesReport:
    """:func:`find_prototype_sources` with a distinct patch per prototype (greedy by value)."""
    device = next(model.parameters()).device
    k = min(count, _FIRST_K)  # every prototype may compete for every patch: start small, widen if one starved
    while True:
        lists = CandidateLists.empty(count, k, device)
        seen, logits, indices = 0, [], []
        for batch in loader:
            images = batch["image"].to(device)
            maps = _maps_and_logits(model, images, count, batch, logits, indices)
            flat = maps.detach().float().flatten(2)  # (B, P, N)
            score = (-flat).masked_fill(flat <= 0, math.inf).transpose(0, 1)  # largest value first; (P, B, N)
            lists.add(score, batch["push_index"], batch_labels(batch), list(batch["id"]),
                      (list(maps.shape[2:]), list(images.shape[2:])))
            seen += images.shape[0]
        lists = lists.merged(collective)
        assignment = assign_distinct(lists, [True] * count)
        if not assignment.starved or k >= count:
            break
        k = min(2 * k, count)
    sources: list[PrototypeSource | None] = [None] * count
    for prototype, entry in sorted(assignment.entry.items()):
        index = int(lists.index[prototype, entry])
        feature_size, image_size = lists.sizes[index]
        sources[prototype] = _source(lists.ids[index], index, int(lists.label[prototype, entry]),
                                     int(lists.cell[prototype, entry]), feature_size, image_size,
                                     1.0 + float(lists.score[prototype, entry]), epoch)
    return SourcesReport(sources=sources, seconds=time.perf_counter() - start, num_samples=seen,
                         logits=_gathered_logits(collective, logits, indices), displaced=assignment.displaced)


def _in_index_order(parts: list[tuple[Tensor, Tensor] | None]) -> Tensor:
    """(N, K) logits of every process's shard, ordered by sample index."""
    parts = [part for part in parts if part is not None]
    if not parts:
        return torch.empty(0)
    index = torch.cat([part[0] for part in parts])
    return torch.cat([part[1] for part in parts])[index.argsort()]


__all__ = ["SourcesReport", "find_prototype_sources", "keeps_prototype_sources"]
