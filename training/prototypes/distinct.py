"""Distinct prototype sources: no two prototypes take the same training patch.

ProtoPNet's push (Chen et al., NeurIPS 2019) projects every prototype onto its nearest own-class training patch on
its own, so prototypes that drifted to one place become one patch (the original code allows it; its pruning merges
such duplicates afterwards). A gallery that shows one patch several times explains less than it claims, so pellucid
assigns distinct sources by default (``PushOptions.unique_sources``): one streaming pass keeps, per prototype, its k
best candidates in (score, sample index, feature cell) order (:class:`CandidateLists`; memory flat in the dataset
size), and :func:`assign_distinct` then walks every kept (score, prototype) pair in increasing order: the closest
prototype keeps a contested patch, the others take their nearest patch not already taken.

This equals the same greedy over *every* candidate unless some prototype found all its k candidates taken; only then
can a candidate outside the lists matter. :func:`assign_distinct` reports such prototypes (``starved``) and the caller
repeats the pass with twice the k (with k at least the number of competing prototypes none can starve), so the
result is exact. It does not depend on the batch size, the batch order or the number of processes: ties are broken
by sample index, then feature cell (row-major), then prototype index, and processes merge their lists before the
assignment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pellucid.training.prototypes.push_data import Collective

_EMPTY_KEY = torch.iinfo(torch.long).max  # sorts after every candidate
_CELL_BITS = 32  # a key is sample index * 2**32 + flat feature cell


def _keys(index: Tensor, cell: Tensor) -> Tensor:
    """One sortable integer per candidate: sample index, then feature cell; empty entries (index < 0) last."""
    return torch.where(index < 0, _EMPTY_KEY, index * (1 << _CELL_BITS) + cell)


def _gather(values: Tensor, order: Tensor) -> Tensor:
    """``values`` (R, M) or (R, M, D) taken along axis 1 at ``order`` (R, k)."""
    if values.ndim == 2:
        return values.gather(1, order)
    return values.gather(1, order.unsqueeze(2).expand(-1, -1, values.shape[2]))


def _smallest(k: int, score: Tensor, index: Tensor, cell: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    """Per row, the k entries smallest in (score, sample index, cell) order, from (R, M[, D]) tensors."""
    by_key = torch.sort(_keys(index, cell), dim=1, stable=True).indices
    by_score = torch.sort(score.gather(1, by_key), dim=1, stable=True).indices
    order = by_key.gather(1, by_score)[:, :k]
    return tuple(_gather(t, order) for t in (score, index, cell, *others))


def _best_positions(flat: Tensor, k: int) -> Tensor:
    """(R, k') columns of the k' = min(k, M) smallest entries of each row of ``flat`` (R, M), ties to the lowest column.

    ``topk`` may return any of several equal entries; where a finite value ties across the k-th place (the (k+1)-th
    smallest equals the k-th), the lowest columns among the tied entries are taken instead.
    """
    rows, columns = flat.shape
    if columns <= k:
        return torch.arange(columns, device=flat.device).expand(rows, columns)
    values, position = flat.topk(k + 1, dim=1, largest=False, sorted=True)
    position = position[:, :k]
    ambiguous = ((values[:, k] == values[:, k - 1]) & torch.isfinite(values[:, k - 1])).nonzero().flatten()
    if ambiguous.numel():
        tied = flat[ambiguous]
        threshold = values[ambiguous, k - 1 : k]
        below = tied < threshold
        equal = tied == threshold
        take = below | (equal & (equal.cumsum(dim=1) <= k - below.sum(dim=1, keepdim=True)))
        position[ambiguous] = take.nonzero()[:, 1].view(-1, k)
    return position


@dataclass
class CandidateLists:
    """Per prototype, the k best candidates seen so far (score ascending; ties by sample index, then feature cell).

    Attributes:
        score: (P, k) score of each kept candidate (a distance; ``inf`` marks an empty entry).
        index: (P, k) dataset index of its image (-1 where empty).
        cell: (P, k) flat (row-major) feature cell of the candidate.
        label: (P, k) class index of its image.
        vector: (P, k, D) latent vector of the candidate (``None`` when the caller keeps none).
        ids: Sample id of every kept dataset index.
        sizes: (feature size, image size) of every kept dataset index.
    """

    score: Tensor
    index: Tensor
    cell: Tensor
    label: Tensor
    vector: Tensor | None = None
    ids: dict[int, str] = field(default_factory=dict)
    sizes: dict[int, tuple[list[int], list[int]]] = field(default_factory=dict)

    @classmethod
    def empty(cls, count: int, k: int, device: torch.device, vector_size: int | None = None,
              dtype: torch.dtype = torch.float32) -> CandidateLists:
        """Lists of ``count`` prototypes with room for ``k`` candidates each (and vectors of ``vector_size``)."""
        if k < 1:
            raise ValueError(f"CandidateLists: k must be >= 1, got {k}")
        missing = torch.full((count, k), -1, dtype=torch.long, device=device)
        vector = None if vector_size is None else torch.zeros(count, k, vector_size, dtype=dtype, device=device)
        return cls(torch.full((count, k), math.inf, device=device), missing, missing.clone(), missing.clone(), vector)

    @property
    def k(self) -> int:
        """Candidates kept per prototype."""
        return self.score.shape[1]

    def add(self, score: Tensor, sample_index: Tensor, label: Tensor, ids: list[str],
            sizes: tuple[list[int], list[int]], rows: Tensor | None = None, cells: Tensor | None = None,
            vectors: Tensor | None = None) -> None:
        """Offer one batch's candidates to the prototypes ``rows``.

        Args:
            score: (R, B, N) score of candidate n of image b for prototype ``rows[r]`` (``inf``: not a candidate).
            sample_index: (B,) dataset index of each image.
            label: (B,) class index of each image.
            ids: Sample id of each image.
            sizes: (feature size, image size) of the batch.
            rows: (R,) the prototypes ``score`` is for (``None``: every prototype, in order).
            cells: (R, B, N) flat feature cell of each candidate, in increasing order along N (``None``: candidate n is
                cell n).
            vectors: Latent vector of each candidate, (B, N, D) when shared by every prototype or (R, B, N, D);
                needed when the lists keep vectors.
        """
        if rows is None:
            rows = torch.arange(self.score.shape[0], device=score.device)
        size, candidates = score.shape[1], score.shape[2]
        sample_index, label = sample_index.to(score.device), label.to(score.device)
        order = sample_index.argsort()
        if bool((order != torch.arange(size, device=order.device)).any()):  # ties go to the lowest index: sort first
            score, sample_index, label = score[:, order], sample_index[order], label[order]
            cells = None if cells is None else cells[:, order]
            vectors = None if vectors is None else vectors[order] if vectors.ndim == 3 else vectors[:, order]
            ids = [ids[i] for i in order.tolist()]
        flat = score.reshape(len(rows), size * candidates)  # columns in (image, cell) order
        row_best = flat.amin(dim=1)
        better = torch.isfinite(row_best) & (row_best <= self.score[rows, -1])
        if not bool(better.all()):
            flat, rows = flat[better], rows[better]
            cells = None if cells is None else cells[better]
            vectors = vectors if vectors is None or vectors.ndim == 3 else vectors[better]
        if rows.numel() == 0:
            return
        position = _best_positions(flat, self.k)
        image = position // candidates
        cell = position % candidates if cells is None else cells.reshape(len(rows), -1).gather(1, position)
        new = [flat.gather(1, position), sample_index[image], cell, label[image]]
        old = [self.score[rows], self.index[rows], self.cell[rows], self.label[rows]]
        if self.vector is not None:
            if vectors is None:
                raise ValueError("CandidateLists.add: these lists keep vectors; pass the candidates' vectors")
            if vectors.ndim == 3:  # shared by every prototype
                vector = vectors.reshape(size * candidates, -1)[position]
            else:
                vector = _gather(vectors.reshape(len(rows), size * candidates, -1), position)
            new.append(vector.to(self.vector))
            old.append(self.vector[rows])
        kept = _smallest(self.k, *(torch.cat([a, b], dim=1) for a, b in zip(old, new, strict=True)))
        self.score[rows], self.index[rows], self.cell[rows], self.label[rows] = kept[:4]
        if self.vector is not None:
            self.vector[rows] = kept[4]
        for i in kept[1].unique().tolist():
            if 0 <= i and i not in self.ids:
                self.ids[i], self.sizes[i] = ids[int((sample_index == i).nonzero()[0, 0])], sizes
        if len(self.ids) > 2 * self.score.numel():  # forget images no list holds any more: bounded by 2 P k
            self._forget_dropped()

    def _forget_dropped(self) -> None:
        held = set(self.index.flatten().tolist())
        self.ids = {i: name for i, name in self.ids.items() if i in held}
        self.sizes = {i: size for i, size in self.sizes.items() if i in held}

    def merged(self, collective: Collective) -> CandidateLists:
        """The lists of every process merged (the same on every process)."""
        tensors = [self.score, self.index, self.cell, self.label] + ([] if self.vector is None else [self.vector])
        gathered = [torch.cat(list(collective.all_gather(t)), dim=1) for t in tensors]  # (P, W k[, D])
        kept = _smallest(self.k, *gathered)
        self._forget_dropped()
        ids: dict[int, str] = {}
        sizes: dict[int, tuple[list[int], list[int]]] = {}
        for part_ids, part_sizes in collective.all_gather_object((self.ids, self.sizes)):
            ids.update(part_ids)
            sizes.update(part_sizes)
        return CandidateLists(*kept[:4], kept[4] if self.vector is not None else None, ids, sizes)


@dataclass
class Assignment:
    """What :func:`assign_distinct` chose.

    Attributes:
        entry: Prototype -> the entry of its list it takes.
        starved: Prototypes whose full list was taken by closer prototypes (repeat with a larger k).
        displaced: Prototypes that did not get their own best candidate (a closer prototype took it).
    """

    entry: dict[int, int]
    starved: list[int]
    displaced: int


def assign_distinct(lists: CandidateLists, active: list[bool], per_image: bool = False) -> Assignment:
    """Greedy assignment by score: each patch (or image, ``per_image``) to at most one prototype.

    Pairs (score, sample index, cell, prototype) are visited in increasing order; a prototype takes the first of its
    candidates not yet taken. Inactive (pruned) prototypes take nothing.

    Args:
        lists: Every process's merged lists (:meth:`CandidateLists.merged`).
        active: Whether each prototype takes part.
        per_image: At most one prototype per image (the image's key) instead of per patch (image and cell).
    """
    count, k = lists.score.shape
    score, index, cell = lists.score.flatten(), lists.index.flatten(), lists.cell.flatten()
    prototype = torch.arange(count, device=score.device).repeat_interleave(k)
    by_key = torch.sort(_keys(index, cell), stable=True).indices  # entries are in prototype order already
    order = by_key[torch.sort(score[by_key], stable=True).indices]
    usable = torch.isfinite(score) & (index >= 0) & torch.tensor(active, device=score.device)[prototype]
    order = order[usable[order]]
    chosen: dict[int, int] = {}
    taken: set[tuple[int, int]] = set()
    for position, sample, where in zip(order.tolist(), index[order].tolist(), cell[order].tolist(), strict=True):
        p = position // k
        patch = (sample, -1 if per_image else where)
        if p in chosen or patch in taken:
            continue
        chosen[p] = position % k
        taken.add(patch)
        if len(chosen) == count:
            break
    full = torch.isfinite(lists.score).all(dim=1).tolist()
    starved = [p for p in range(count) if active[p] and p not in chosen and full[p]]
    return Assignment(chosen, starved, sum(entry != 0 for entry in chosen.values()))


__all__ = ["Assignment", "CandidateLists", "assign_distinct"]
