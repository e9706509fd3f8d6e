"""Push (prototype projection): replace each prototype by its nearest training patch, and record where it came from.

Chen et al., NeurIPS 2019, section 2.2 ("projection of prototypes"). :func:`push_prototypes` streams once over an
unaugmented, unshuffled push loader, keeping per prototype only the best candidate so far (memory does not grow
with the dataset); a prototype may only take a patch from a training image of its own class. By default no two
prototypes take the same patch: each keeps its k best candidates and a greedy assignment by distance gives every
prototype its own (:mod:`pellucid.training.prototypes.distinct`). Under DDP each
process streams over its own shard; the per-prototype minima are gathered from every process, the winner of
each prototype is chosen by (distance, sample index) exactly as one process scanning in index order would, and
the winning vectors and provenance are sent to every process, so all processes hold the same prototypes (the
distinct push merges every process's candidate lists before assigning, with the same result).
:func:`~pellucid.training.prototypes.nearest.find_nearest_patches` streams the same way for the k nearest training
images of each prototype (galleries, pruning). :class:`PrototypePush` is the Lightning callback that runs push at the
start of given epochs and/or every N epochs, and optionally prunes afterwards; for a model whose prototypes cannot
be replaced (PIP-Net) it only finds their sources (:mod:`pellucid.training.prototypes.sources`). The push loader and
the all-gather live in :mod:`pellucid.training.prototypes.push_data` (re-exported here).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from pellucid.models.prototypes import PrototypeNetwork, PrototypeSource, PushCandidates
from pellucid.training.prototypes.distinct import CandidateLists, assign_distinct
from pellucid.training.prototypes.nearest import NO_INDEX, find_nearest_patches
from pellucid.training.prototypes.pruning import PrototypePruning, PruningReport
from pellucid.training.prototypes.push_data import Collective, batch_labels, on_lesion, push_dataloader, push_dataset


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode inside, and afterwards every module's own mode back (a frozen group's norms stay in eval mode)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _coordinates(flat: Tensor, size: Sequence[int]) -> Tensor:
    """(...,) flat indices -> (..., len(size)) coordinates in row-major order."""
    coords, rest = [], flat
    for extent in reversed(list(size)):
        coords.append(rest % extent)
        rest = rest // extent
    return torch.stack(coords[::-1], dim=-1)


def _source(sample_id: str, sample_index: int, label: int, feature_flat: int, feature_size: Sequence[int],
            image_size: Sequence[int], distance: float, epoch: int) -> PrototypeSource:
    """Provenance of one patch: its feature coordinates and their footprint in the image."""
    coords = _coordinates(torch.tensor(feature_flat), feature_size).tolist()
    scale = [s / f for s, f in zip(image_size, feature_size, strict=True)]
    box = [[int(math.floor(c * r)), min(int(s), int(math.ceil((c + 1) * r)))]
           for c, r, s in zip(coords, scale, image_size, strict=True)]
    center = [(c + 0.5) * r - 0.5 for c, r in zip(coords, scale, strict=True)]
    return PrototypeSource(sample_id=sample_id, sample_index=sample_index, label=label, feature_index=coords,
                           feature_size=list(feature_size), image_center=center, image_box=box,
                           distance=distance, epoch=epoch)


@dataclass
class PushReport:
    """What a push did.

    Attributes:
        sources: Provenance per prototype (``None`` where it was pruned or no training image of its class was found).
        seconds: Wall time of the pass, including synchronisation.
        num_samples: Images this process streamed over (the last pass, when a distinct push needed two).
        pruning: What the pruning after this push removed (when the callback prunes).
        displaced: Prototypes whose nearest patch a closer prototype took, so they took their next one (distinct
            sources only).
    """

    sources: list[PrototypeSource | None]
    seconds: float
    num_samples: int
    pruning: PruningReport | None = None
    displaced: int = 0

    @property
    def pushed(self) -> int:
        """Prototypes that were replaced."""
        return sum(s is not None for s in self.sources)


def _winners(distance: Tensor, index: Tensor, collective: Collective) -> tuple[Tensor, Tensor, Tensor]:
    """Rank whose candidate wins per prototype ((distance, sample index) order), the gathered minima and indices."""
    all_distance = collective.all_gather(distance)  # (W, P)
    all_index = collective.all_gather(index)
    smallest = all_distance.min(dim=0).values
    tie_break = torch.where(all_distance == smallest, all_index.masked_fill(all_index < 0, NO_INDEX), NO_INDEX)
    return tie_break.argmin(dim=0), all_distance, all_index


@torch.no_grad()
def push_prototypes(model: PrototypeNetwork, loader: DataLoader, collective: Collective | None = None,
                    epoch: int = -1, within_mask: bool = False, unique: bool = False,
                    unique_sources: bool = True) -> PushReport:
    """Replace every active prototype by the nearest candidate from a training image of its class; record provenance.

    Args:
        model: A prototype network (put it in eval mode first).
        loader: This process's shard, in increasing index order, items tagged ``push_index`` (:func:`push_dataloader`).
        collective: How to gather across processes (``None``: one process).
        epoch: Stored in the provenance.
        within_mask: In an image whose ``mask`` marks a lesion, only patches on the lesion are candidates
            (:func:`~pellucid.models.prototype_losses.lesion_cells`); images with an empty mask (no lesion, e.g. the
            normal class) keep every patch. Needs ``mask`` in the push batches.
        unique: No two prototypes take their patch from the same training image (stronger than ``unique_sources``):
            assigned greedily as there, each image counted once by its closest patch.
        unique_sources: No two prototypes take the same source patch (image and feature cell): prototypes are
            assigned greedily in order of distance, the closest keeping a contested patch and the others taking their
            nearest patch not yet taken (:mod:`pellucid.training.prototypes.distinct`; exact, whatever the batches).
            Without it (the original ProtoPNet), prototypes of a class that drifted together are projected onto one
            patch and stay identical.

    Returns:
        The report; the model's prototypes and their ``sources`` are updated in place.
    """
    collective = collective or Collective()
    start = time.perf_counter()
    if unique or unique_sources:
        return _distinct_push(model, loader, collective, epoch, within_mask, unique, start)
    layer = model.prototypes
    count, device = layer.num_prototypes, layer.vectors.device
    prototype_range = torch.arange(count, device=device)
    best_distance = torch.full((count,), math.inf, device=device)
    best_index = torch.full((count,), -1, dtype=torch.long, device=device)
    best_vector = layer.vectors.detach().clone()
    best_feature = torch.zeros(count, dtype=torch.long, device=device)
    best_label = torch.full((count,), -1, dtype=torch.long, device=device)
    best_id = [""] * count
    sizes: dict[int, tuple[list[int], list[int]]] = {}  # prototype -> (feature size, image size) of its best image
    seen = 0
    for batch in loader:
        images = batch["image"].to(device)
        candidates: PushCandidates = model.push_candidates(images)
        own = model.own_prototypes(batch["label"].to(device)) & layer.active  # pruned prototypes stay as they are
        distances = candidates.distances.masked_fill(~own.unsqueeze(2), math.inf)  # (B, P, N)
        if within_mask:
            distances = distances.masked_fill(~on_lesion(batch, candidates, device), math.inf)
        location = distances.argmin(dim=2)  # first minimum: the lowest location wins ties
        per_image = distances.gather(2, location.unsqueeze(2)).squeeze(2)  # (B, P)
        image_winner = per_image.argmin(dim=0)  # first minimum: the lowest sample index wins ties
        candidate = per_image[image_winner, prototype_range]
        improved = (candidate < best_distance).nonzero().flatten()  # strict: earlier samples win ties
        seen += images.shape[0]
        if improved.numel() == 0:
            continue
        rows, cells = image_winner[improved], location[image_winner[improved], improved]
        vector_axis = improved if candidates.vectors.shape[1] > 1 else torch.zeros_like(improved)
        best_vector[improved] = candidates.vectors[rows, vector_axis, cells].to(best_vector)
        flat = cells if candidates.feature_index is None else candidates.feature_index[rows, improved, cells]
        best_feature[improved] = flat
        best_distance[improved] = candidate[improved]
        best_index[improved] = batch["push_index"].to(device)[rows]
        best_label[improved] = batch_labels(batch).to(device)[rows]
        for prototype, row in zip(improved.tolist(), rows.tolist(), strict=True):
            best_id[prototype] = batch["id"][row]
            sizes[prototype] = (list(candidates.feature_size), list(images.shape[2:]))

    winner, all_distance, all_index = _winners(best_distance, best_index, collective)
    vectors = collective.all_gather(best_vector)[winner, prototype_range]
    features = collective.all_gather(best_feature)[winner, prototype_range].tolist()
    labels = collective.all_gather(best_label)[winner, prototype_range].tolist()
    distance = all_distance[winner, prototype_range].tolist()
    index = all_index[winner, prototype_range].tolist()
    everything = collective.all_gather_object((best_id, sizes))
    sources: list[PrototypeSource | None] = []
    for p, rank in enumerate(winner.tolist()):
        if not math.isfinite(distance[p]):
            sources.append(None)
            continue
        ids, rank_sizes = everything[rank]
        feature_size, image_size = rank_sizes[p]
        sources.append(_source(ids[p], index[p], labels[p], features[p], feature_size, image_size, distance[p],
                               epoch))
    layer.project(vectors, sources)
    return PushReport(sources=sources, seconds=time.perf_counter() - start, num_samples=seen)


def _candidate_lists(model: PrototypeNetwork, loader: DataLoader, k: int, within_mask: bool,
                     per_image: bool) -> tuple[CandidateLists, int]:
    """One streaming pass keeping each prototype's k best own-class candidates (with their vectors)."""
    layer = model.prototypes
    device = layer.vectors.device
    lists = CandidateLists.empty(layer.num_prototypes, k, device, layer.vectors.shape[1], layer.vectors.dtype)
    seen = 0
    for batch in loader:
        images = batch["image"].to(device)
        seen += images.shape[0]
        candidates: PushCandidates = model.push_candidates(images)
        own = model.own_prototypes(batch["label"].to(device)) & layer.active  # pruned prototypes stay as they are
        rows = own.any(dim=0).nonzero().flatten()  # only these prototypes have a candidate in this batch
        if rows.numel() == 0:
            continue
        distances = candidates.distances.transpose(0, 1)[rows]  # (R, B, N)
        distances.masked_fill_(~own.t()[rows].unsqueeze(2), math.inf)
        if within_mask:
            lesion = on_lesion(batch, candidates, device).transpose(0, 1)  # (P or 1, B, N)
            distances.masked_fill_(~(lesion[rows] if lesion.shape[0] > 1 else lesion), math.inf)
        cells = None if candidates.feature_index is None else candidates.feature_index.transpose(0, 1)[rows]
        shared = candidates.vectors.shape[1] == 1
        vectors = candidates.vectors[:, 0] if shared else candidates.vectors.transpose(0, 1)[rows]
        if per_image and distances.shape[2] > 1:  # an image counts once, by its closest candidate (the first of ties)
            location = distances.argmin(dim=2, keepdim=True)  # (R, B, 1)
            distances = distances.gather(2, location)
            cells = location if cells is None else cells.gather(2, location)
            if shared:  # (B, N, D) -> (R, B, 1, D)
                vectors = vectors.unsqueeze(0).expand(len(rows), -1, -1, -1)
            vectors = vectors.gather(2, location.unsqueeze(3).expand(-1, -1, -1, vectors.shape[3]))
        lists.add(distances, batch["push_index"], batch_labels(batch), list(batch["id"]),
                  (list(candidates.feature_size), list(images.shape[2:])), rows, cells, vectors)
    return lists, seen


def _distinct_push(model: PrototypeNetwork, loader: DataLoader, collective: Collective, epoch: int,
                   within_mask: bool, per_image: bool, start: float) -> PushReport:
    """Push with a distinct source patch (or image, ``per_image``) per prototype (see :func:`push_prototypes`)."""
    layer = model.prototypes
    active = layer.active.tolist()
    classes = [c for c, a in zip(layer.prototype_classes.tolist(), active, strict=True) if a]
    limit = max(1, len(classes))  # with k >= the active prototypes none can find all its candidates taken
    k = max([classes.count(c) for c in set(classes)] or [1])  # one class's prototypes compete for its images
    while True:
        lists, seen = _candidate_lists(model, loader, k, within_mask, per_image)
        lists = lists.merged(collective)
        assignment = assign_distinct(lists, active, per_image)
        if not assignment.starved or k >= limit:
            break
        k = min(2 * k, limit)  # several classes' prototypes shared images (multi-label): look further
    vectors = layer.vectors.detach().clone()
    sources: list[PrototypeSource | None] = [None] * layer.num_prototypes
    for prototype, entry in sorted(assignment.entry.items()):
        index = int(lists.index[prototype, entry])
        feature_size, image_size = lists.sizes[index]
        vectors[prototype] = lists.vector[prototype, entry]
        sources[prototype] = _source(lists.ids[index], index, int(lists.label[prototype, entry]),
                                     int(lists.cell[prototype, entry]), feature_size, image_size,
                                     float(lists.score[prototype, entry]), epoch)
    layer.project(vectors, sources)
    return PushReport(sources=sources, seconds=time.perf_counter() - start, num_samples=seen,
                      displaced=assignment.displaced)


@torch.no_grad()
def source_gaps(model: PrototypeNetwork, dataset: Dataset) -> Tensor:
    """(P,) largest absolute difference between each pushed prototype and the latent patch at its recorded source.

    A pushed prototype *is* its source patch ("this looks like that"): the gap is 0 up to float rounding unless
    something changed the latent space after the push (training the backbone, or batch-norm statistics that kept
    moving). NaN for a prototype without a source. Looks each source up in ``dataset`` by ``sample_index`` and
    checks its ``id``.

    Raises:
        ValueError: when the item at a source's index has another id (not the data the model was pushed onto).
    """
    layer = model.prototypes
    gaps = torch.full((layer.num_prototypes,), math.nan)
    with evaluating(model):
        for prototype, source in enumerate(layer.sources):
            if source is None:
                continue
            item = dataset[source.sample_index]
            if item["id"] != source.sample_id:
                raise ValueError(f"prototype {prototype}: its source is {source.sample_id!r} at index "
                                 f"{source.sample_index}, but the dataset holds {item['id']!r} there; pass the data "
                                 "the model was pushed onto")
            image = item["image"].unsqueeze(0).to(layer.vectors.device)
            candidates = model.push_candidates(image)
            column = 0  # one candidate per prototype (XProtoNet's occurrence-pooled vector): that one
            if candidates.distances.shape[2] > 1:  # one per latent patch: the recorded one
                flat = 0
                for coordinate, extent in zip(source.feature_index, candidates.feature_size, strict=True):
                    flat = flat * extent + coordinate
                cells = (torch.arange(candidates.distances.shape[2], device=image.device)
                         if candidates.feature_index is None else candidates.feature_index[0, prototype])
                column = int(torch.nonzero(cells == flat)[0, 0])
            vector = candidates.vectors[0, prototype if candidates.vectors.shape[1] > 1 else 0, column]
            gaps[prototype] = float((vector - layer.vectors[prototype]).abs().max())
    return gaps


class PrototypePush(pl.Callback):
    """Run push at the start of given epochs and/or every N epochs, then optionally prune.

    A family's recipe builds this callback (:mod:`pellucid.training.recipes`): it pushes at the start of every phase
    marked ``push``. It reads no other callback's state: the epochs are given. Logs ``push/prototypes_pushed``,
    ``push/mean_distance``, ``push/seconds``, ``push/prototypes_displaced`` (prototypes that took their next patch
    because a closer one took their nearest) and ``push/prototypes_active`` after pruning. The provenance is stored
    in the model, hence in checkpoints.

    Args:
        epochs: Push at the start of these epochs (0-based).
        every_n_epochs: Also push at the start of epochs N, 2N, ... (``None``: only at ``epochs``).
        batch_size: Push loader batch size (default: the data module's ``batch_size``, else 32).
        num_workers: Push loader workers (default: the data module's ``num_workers``, else 0).
        pruning: Prune after each push (see :class:`~pellucid.training.prototypes.pruning.PrototypePruning`).
        within_mask: Push onto lesion patches only, in images whose mask marks a lesion (see
            :func:`push_prototypes`).
        unique: At most one prototype per training image (see :func:`push_prototypes`).
        unique_sources: No two prototypes take the same source patch (see :func:`push_prototypes`); for a model
            that only keeps sources (PIP-Net), no two prototypes are shown with the same patch.
    """

    def __init__(self, epochs: list[int] | None = None, every_n_epochs: int | None = None,
                 batch_size: int | None = None, num_workers: int | None = None,
                 pruning: PrototypePruning | None = None, within_mask: bool = False, unique: bool = False,
                 unique_sources: bool = True) -> None:
        if not epochs and every_n_epochs is None:
            raise ValueError("PrototypePush: give epochs (push when one starts) and/or every_n_epochs")
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ValueError(f"PrototypePush: every_n_epochs must be >= 1, got {every_n_epochs}")
        if any(epoch < 0 for epoch in epochs or []):
            raise ValueError(f"PrototypePush: epochs must be >= 0, got {epochs}")
        self.epochs, self.every_n_epochs = sorted(set(epochs or [])), every_n_epochs
        self.batch_size, self.num_workers, self.pruning = batch_size, num_workers, pruning
        self.within_mask, self.unique, self.unique_sources = within_mask, unique, unique_sources
        self.reports: list[PushReport] = []
        self._final_pass_done = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check the model is a prototype network, or keeps the sources found for its prototypes (PIP-Net)."""
        from pellucid.training.prototypes.sources import keeps_prototype_sources  # sources imports this module

        self._final_pass_done = False
        model = getattr(pl_module, "model", None)
        if isinstance(model, PrototypeNetwork):
            return
        if not keeps_prototype_sources(model):
            raise TypeError(f"PrototypePush needs a prototype network, got {type(model).__name__}")
        if self.pruning is not None or self.within_mask or self.unique:
            raise ValueError(f"PrototypePush: pruning, within_mask and unique need prototypes that push replaces; "
                             f"{model.name} only keeps the sources found for its prototypes: turn them off")

    def should_push(self, epoch: int) -> bool:
        """Whether a push runs at the start of epoch ``epoch``."""
        if self.every_n_epochs is not None and epoch > 0 and epoch % self.every_n_epochs == 0:
            return True
        return epoch in self.epochs

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Push (and prune) when due."""
        if self.should_push(trainer.current_epoch):
            self.push(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object, batch: object,
                           batch_idx: int) -> None:
        """After the last step of the last epoch, a model that keeps sources (PIP-Net) gets them from its final weights.

        Before the last validation and checkpoint, so both see them; the abstention thresholds come with them.
        """
        last_epoch = trainer.max_epochs is not None and trainer.current_epoch == trainer.max_epochs - 1
        if last_epoch and batch_idx == trainer.num_training_batches - 1 and \
                not isinstance(pl_module.model, PrototypeNetwork):
            self.find_sources(trainer, pl_module)
            self._final_pass_done = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A fit that ended otherwise (steps, time, early stopping) gets the sources from its final weights now."""
        if not isinstance(pl_module.model, PrototypeNetwork) and not self._final_pass_done:
            self.find_sources(trainer, pl_module, log=False)  # Lightning allows no logging once training ended

    def loader(self, trainer: pl.Trainer) -> DataLoader:
        """This process's shard of the push data."""
        datamodule = trainer.datamodule
        batch_size = self.batch_size or getattr(datamodule, "batch_size", None) or 32
        workers = self.num_workers if self.num_workers is not None else getattr(datamodule, "num_workers", 0)
        return push_dataloader(push_dataset(trainer), batch_size, workers, trainer.global_rank, trainer.world_size)

    def push(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> PushReport:
        """Run push now (eval mode, no gradients), log it, prune if configured; return the report.

        A model that keeps prototype sources instead (``record_prototype_sources``, PIP-Net) is not changed: the
        training patch where each prototype is most present is found and handed to it (:meth:`find_sources`), now and
        again after the last training step, so the sources describe the final weights.
        """
        model: PrototypeNetwork = pl_module.model
        if not isinstance(model, PrototypeNetwork):
            return self.find_sources(trainer, pl_module)
        collective, loader = Collective.from_trainer(trainer), self.loader(trainer)
        with evaluating(model):
            report = push_prototypes(model, loader, collective, epoch=trainer.current_epoch,
                                     within_mask=self.within_mask, unique=self.unique,
                                     unique_sources=self.unique_sources)
            if self.pruning is not None:
                nearest = find_nearest_patches(model, loader, self.pruning.k, collective)
                report.pruning = self.pruning.apply(model, nearest)
        missing = [p for p, s in enumerate(report.sources) if s is None and bool(model.prototypes.active[p])]
        if missing:
            rank_zero_warn(f"PrototypePush: prototypes {missing} have no training image of their class; left unchanged")
        distances = [s.distance for s in report.sources if s is not None]
        values = {"push/prototypes_pushed": float(report.pushed), "push/seconds": report.seconds,
                  "push/mean_distance": sum(distances) / max(1, len(distances)),
                  "push/prototypes_displaced": float(report.displaced)}
        if self.pruning is not None:
            values["push/prototypes_active"] = float(model.prototypes.active.sum())
        pl_module.log_dict(values, on_step=False, on_epoch=True)
        self.reports.append(report)
        return report

    def find_sources(self, trainer: pl.Trainer, pl_module: pl.LightningModule, log: bool = True) -> PushReport:
        """Find each prototype's source without changing the model; log (when ``log``) and return the report.

        The model gets the sources (``record_prototype_sources``) and its logits on the training data
        (``calibrate_abstention``).
        """
        from pellucid.training.prototypes.sources import find_prototype_sources  # sources imports this module

        model = pl_module.model
        with evaluating(model):
            report = find_prototype_sources(model, self.loader(trainer), Collective.from_trainer(trainer),
                                            epoch=trainer.current_epoch, unique_sources=self.unique_sources)
        model.record_prototype_sources([None if source is None else source.to_dict() for source in report.sources])
        model.calibrate_abstention(report.logits)
        distances = [s.distance for s in report.sources if s is not None]
        self.reports.append(report)
        if not log:
            return report
        pl_module.log_dict({"push/sources_found": float(report.pushed), "push/seconds": report.seconds,
                            "push/mean_distance": sum(distances) / max(1, len(distances)),
                            "push/prototypes_displaced": float(report.displaced)}, on_step=False, on_epoch=True)
        return report
