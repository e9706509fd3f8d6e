"""Metrics of visual recognizability for prototype networks, as torchmetrics ``Metric``s (they sync across DDP).

Every metric reads ``prototype_maps`` (B, P, *s) from :class:`~pellucid.models.ModelOutput` and the batch's ground
truth. A prototype's *patch* in an image is its peak location; the *structure* under a patch comes from
:func:`patch_structure`: the phantom ``lesion_type`` (1..8) where the feature cell touches the lesion mask, 0
(background tissue) elsewhere, or just lesion (1) / background (0).

- :class:`PrototypePurity`: among each prototype's k nearest images (one patch per image, by peak similarity), the
  share whose patch lies on its most common structure (Nauta et al., "PIP-Net", CVPR 2023), averaged over prototypes.
- :class:`KNNClassPurity`: share of those k images that belong to the prototype's class.
- :class:`PrototypeActivationPrecision`: share of the >= 95th-percentile activation of the most activated own-class
  prototype that lies inside the lesion mask (reuses
  :class:`~pellucid.training.elements.localization.ActivationPrecision`).
- :class:`PrototypeConsistency`: share of prototypes whose peak lands on the same structure in at least
  ``threshold`` of the images of their class (Huang et al., "Evaluation and improvement of interpretability for
  self-explainable part-prototype networks", ICCV 2023).
- :class:`PrototypeStability`: share of own-class images whose peak structure is unchanged under small input noise,
  averaged over prototypes (same paper).
- :func:`duplicate_sources`: how many prototypes show a source patch (image and latent cell) that another prototype
  already shows; read from the provenance, not from data.

:class:`PrototypeEvaluation` is the callback that feeds them from validation/test outputs and logs them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from pellucid.models import InterpretableModel
from pellucid.models.maps import upsample_evidence
from pellucid.training.elements.localization import ActivationPrecision


def patch_structure(mask: Tensor, feature_size: tuple[int, ...], lesion_type: Tensor | None = None) -> Tensor:
    """(B, *s) structure id per feature cell: lesion type (or 1) where the cell touches the mask, else 0.

    Args:
        mask: (B, 1, *S) lesion mask at input resolution.
        feature_size: ``*s``.
        lesion_type: (B,) type of each image's lesion; ``None`` gives 1 on the lesion.
    """
    pool = F.adaptive_max_pool2d if mask.ndim == 4 else F.adaptive_max_pool3d
    on_lesion = (pool(mask.float(), feature_size) > 0.5).long()[:, 0]
    if lesion_type is None:
        return on_lesion
    return on_lesion * lesion_type.long().view(-1, *([1] * len(feature_size)))


def duplicate_sources(provenance: Sequence[Mapping[str, Any] | None]) -> int | None:
    """Prototypes whose source patch (sample id and latent cell) a prototype earlier in the list already has.

    A gallery showing one patch twice explains one thing twice; 0 is best. Prototypes without a source and pruned ones
    (``pruned`` set: they no longer explain anything) are left out; an entry without ``feature_index`` (a model that
    records whole images) is compared by its image. ``None`` when no prototype has a source yet.

    Args:
        provenance: One entry per prototype (``prototype_provenance()`` of the explanation protocol).
    """
    shown = [(entry.get("sample_id"), tuple(entry.get("feature_index") or ())) for entry in provenance
             if entry is not None and not entry.get("pruned")]
    if not shown:
        return None
    return len(shown) - len(set(shown))


def _peaks(prototype_maps: Tensor) -> tuple[Tensor, Tensor]:
    """(B, P) peak similarity and flat peak location of every prototype in every image."""
    peak, location = prototype_maps.flatten(2).max(dim=2)
    return peak, location


def _at_peaks(structure: Tensor, location: Tensor) -> Tensor:
    """(B, P) structure id under each prototype's peak, from (B, *s) structure and (B, P) flat locations."""
    return structure.flatten(1).gather(1, location)


def _merge_nearest(stacked: Tensor) -> Tensor:
    """DDP reduction: (W, P, k, 2) per-process nearest lists -> (P, k, 2) overall nearest."""
    if stacked.ndim == 3:
        return stacked
    k = stacked.shape[2]
    combined = torch.cat(list(stacked), dim=1)  # (P, W * k, 2)
    order = combined[..., 0].argsort(dim=1, descending=True)[:, :k]
    return combined.gather(1, order.unsqueeze(2).expand(-1, -1, 2))


class _NearestImages(Metric):
    """Keeps, per prototype, the k images where it is most activated and a value (structure, class) per image."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_prototypes: int, k: int = 10, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.num_prototypes, self.k = num_prototypes, k
        empty = torch.stack([torch.full((num_prototypes, k), -torch.inf), torch.full((num_prototypes, k), -1.0)], -1)
        self.add_state("nearest", default=empty.double(), dist_reduce_fx=_merge_nearest)  # (P, k, [similarity, value])

    def _add(self, prototype_maps: Tensor, values: Tensor) -> None:
        """Add a batch: maps (B, P, *s) and one value per image and prototype (B, P)."""
        if prototype_maps.shape[1] != self.num_prototypes:
            raise ValueError(f"{type(self).__name__}: expected {self.num_prototypes} prototype maps on axis 1, "
                             f"got shape {tuple(prototype_maps.shape)}")
        peak, _ = _peaks(prototype_maps.detach())
        peak = peak.double().masked_fill(peak <= 0, -torch.inf)  # no activation (a pruned prototype): not a match
        batch = torch.stack([peak.t(), values.t().double().masked_fill(~torch.isfinite(peak.t()), -1.0)], -1)
        self.nearest = _merge_nearest(torch.stack([self.nearest, _pad(batch, self.k)]))

    def _entries(self) -> tuple[Tensor, Tensor]:
        """(P, k) values and (P, k) validity of the kept entries."""
        return self.nearest[..., 1].long(), torch.isfinite(self.nearest[..., 0])


def _pad(batch: Tensor, k: int) -> Tensor:
    """(P, B, 2) -> (P, max(B, k), 2) padded with empty entries, so two lists can be stacked."""
    missing = k - batch.shape[1]
    if missing <= 0:
        top = batch[..., 0].argsort(dim=1, descending=True)[:, :k]
        return batch.gather(1, top.unsqueeze(2).expand(-1, -1, 2))
    pad = torch.stack([torch.full(batch.shape[:1] + (missing,), -torch.inf, dtype=batch.dtype),
                       torch.full(batch.shape[:1] + (missing,), -1.0, dtype=batch.dtype)], -1).to(batch.device)
    return torch.cat([batch, pad], dim=1)


class PrototypePurity(_NearestImages):
    """Mean over prototypes of the share of their k nearest images whose patch shows their most common structure.

    Args:
        num_prototypes: ``P``.
        k: Nearest images per prototype (PIP-Net uses 10).
    """

    def update(self, prototype_maps: Tensor, structure: Tensor) -> None:
        """Add a batch: maps (B, P, *s) and structure ids (B, *s) from :func:`patch_structure`."""
        _, location = _peaks(prototype_maps)
        self._add(prototype_maps, _at_peaks(structure.to(location.device), location))

    def per_prototype(self) -> Tensor:
        """(P,) purity of each prototype (NaN for a prototype that was never activated)."""
        values, valid = self._entries()
        purity = torch.full((self.num_prototypes,), float("nan"))
        for prototype in range(self.num_prototypes):
            kept = values[prototype][valid[prototype]]
            if kept.numel():
                purity[prototype] = kept.bincount().max().item() / kept.numel()
        return purity

    def compute(self) -> Tensor:
        """Mean purity over the prototypes that were activated."""
        return torch.nanmean(self.per_prototype())

    def majority(self) -> Tensor:
        """(P,) most common structure among each prototype's k nearest images (-1 if never activated; ties: lowest)."""
        values, valid = self._entries()
        return torch.tensor([int(values[p][valid[p]].bincount().argmax()) if bool(valid[p].any()) else -1
                             for p in range(self.num_prototypes)])

    def structures_shown(self) -> int:
        """How many distinct structures (background counts as one) the prototypes' nearest images show most often.

        Purity alone rewards prototypes that all show one easy structure; this count shows such a collapse. Under
        DDP the nearest images of every process are merged first (as :meth:`compute` does).
        """
        with self.sync_context():
            majority = self.majority()
        return int(majority[majority >= 0].unique().numel())


class KNNClassPurity(_NearestImages):
    """Mean over prototypes of the share of their k nearest images that belong to the prototype's class.

    Args:
        prototype_classes: (P,) class of each prototype.
        k: Nearest images per prototype.
    """

    def __init__(self, prototype_classes: Tensor, k: int = 10, **kwargs: Any) -> None:
        super().__init__(len(prototype_classes), k, **kwargs)
        self.prototype_classes = torch.as_tensor(prototype_classes).long().cpu()

    def update(self, prototype_maps: Tensor, labels: Tensor) -> None:
        """Add a batch: maps (B, P, *s) and class indices (B,)."""
        self._add(prototype_maps, labels.view(-1, 1).expand(-1, self.num_prototypes))

    def per_prototype(self) -> Tensor:
        """(P,) class purity of each prototype (NaN for a prototype that was never activated)."""
        values, valid = self._entries()
        same = (values == self.prototype_classes.to(values.device).view(-1, 1)) & valid
        return (same.sum(1).double() / valid.sum(1).double()).float().cpu()

    def compute(self) -> Tensor:
        """Mean class purity over the prototypes that were activated."""
        return torch.nanmean(self.per_prototype())


class PrototypeActivationPrecision(ActivationPrecision):
    """Activation precision of the most activated own-class prototype of each image with a lesion.

    Args:
        prototype_classes: (P,) class of each prototype.
        percentile: Activations at or above this percentile of the upsampled map count.
        interpolation: How the map is upsampled to the mask, ``"linear"`` or ``"cubic"`` (pass the model's
            ``localization_interpolation``; see :func:`~pellucid.models.maps.upsample_evidence`).
    """

    def __init__(self, prototype_classes: Tensor, percentile: float = 95.0, interpolation: str = "linear",
                 **kwargs: Any) -> None:
        super().__init__(percentile=percentile, **kwargs)
        self.prototype_classes = torch.as_tensor(prototype_classes).long().cpu()
        self.interpolation = interpolation

    def update(self, prototype_maps: Tensor, mask: Tensor, labels: Tensor) -> None:  # type: ignore[override]
        """Add a batch: maps (B, P, *s), mask (B, 1, *S), class indices (B,)."""
        peak, _ = _peaks(prototype_maps)
        own = self.prototype_classes.to(labels.device).view(1, -1) == labels.view(-1, 1)
        chosen = peak.masked_fill(~own, -torch.inf).argmax(dim=1)  # (B,)
        maps = prototype_maps[torch.arange(len(chosen), device=chosen.device), chosen].unsqueeze(1)
        super().update(upsample_evidence(maps, mask.shape[2:], self.interpolation), mask)


class PrototypeConsistency(Metric):
    """Share of prototypes whose peak lands on one structure in at least ``threshold`` of their class's images.

    Args:
        prototype_classes: (P,) class of each prototype.
        num_structures: Number of structure ids (2 for lesion/background, 9 for phantom lesion types).
        threshold: Smallest share of images on the most common structure for a prototype to count as consistent.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, prototype_classes: Tensor, num_structures: int = 2, threshold: float = 0.8,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.prototype_classes = torch.as_tensor(prototype_classes).long().cpu()
        self.num_structures, self.threshold = num_structures, threshold
        self.add_state("counts", default=torch.zeros(len(self.prototype_classes), num_structures, dtype=torch.long),
                       dist_reduce_fx="sum")

    def update(self, prototype_maps: Tensor, structure: Tensor, labels: Tensor) -> None:
        """Add a batch: maps (B, P, *s), structure ids (B, *s), class indices (B,)."""
        _, location = _peaks(prototype_maps)
        found = F.one_hot(_at_peaks(structure.to(location.device), location), self.num_structures)  # (B, P, S)
        own = self.prototype_classes.to(labels.device).view(1, -1) == labels.view(-1, 1)
        self.counts += (found * own.unsqueeze(2)).sum(dim=0).to(self.counts)

    def frequencies(self) -> Tensor:
        """(P,) share of own-class images on each prototype's most common structure (NaN if none seen)."""
        total = self.counts.sum(dim=1).double()
        return (self.counts.max(dim=1).values.double() / total).float().cpu()

    def compute(self) -> Tensor:
        """Share of consistent prototypes among those that saw an image of their class."""
        frequencies = self.frequencies()
        seen = ~torch.isnan(frequencies)
        return (frequencies[seen] >= self.threshold).float().mean() if bool(seen.any()) else torch.tensor(float("nan"))


class PrototypeStability(Metric):
    """Mean over prototypes of the share of own-class images whose peak structure survives small input noise.

    Args:
        prototype_classes: (P,) class of each prototype.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, prototype_classes: Tensor, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.prototype_classes = torch.as_tensor(prototype_classes).long().cpu()
        count = len(self.prototype_classes)
        self.add_state("agree", default=torch.zeros(count, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(count, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, prototype_maps: Tensor, noisy_maps: Tensor, structure: Tensor, labels: Tensor) -> None:
        """Add a batch: maps of the clean and the noisy images (B, P, *s), structure ids (B, *s), classes (B,)."""
        structure = structure.to(prototype_maps.device)
        clean = _at_peaks(structure, _peaks(prototype_maps)[1])
        noisy = _at_peaks(structure, _peaks(noisy_maps)[1])
        own = self.prototype_classes.to(labels.device).view(1, -1) == labels.view(-1, 1)
        self.agree += ((clean == noisy) & own).sum(dim=0).to(self.agree)
        self.total += own.sum(dim=0).to(self.total)

    def compute(self) -> Tensor:
        """Mean stability over prototypes that saw an image of their class."""
        seen = self.total > 0
        if not bool(seen.any()):
            return torch.tensor(float("nan"))
        return (self.agree[seen].double() / self.total[seen].double()).mean().float()


class PrototypeEvaluation(pl.Callback):
    """Feed the prototype metrics from validation/test outputs and log them as ``<stage>/prototype_<metric>``.

    Needs ``prototype_maps`` in the outputs and ``label``, ``mask`` (and ``lesion_type`` for purity) in the batch;
    metrics whose inputs are missing are skipped. Stability runs one extra forward pass per batch on the image
    plus Gaussian noise (seeded by the batch index, so runs repeat).

    Args:
        k: Nearest images per prototype for the purity metrics.
        percentile: Percentile of the activation precision.
        consistency_threshold: See :class:`PrototypeConsistency`.
        noise_std: Standard deviation of the stability noise (images are roughly in [0, 1.5]).
        stages: Where to evaluate: ``"val"`` and/or ``"test"``.
    """

    def __init__(self, k: int = 10, percentile: float = 95.0, consistency_threshold: float = 0.8,
                 noise_std: float = 0.05, stages: list[str] | None = None) -> None:
        self.k, self.percentile, self.threshold, self.noise_std = k, percentile, consistency_threshold, noise_std
        self.stages = list(stages or ["val", "test"])
        self.metrics: dict[str, Metric] = {}

    def _fresh(self, model: InterpretableModel) -> dict[str, Metric]:
        classes = model.prototype_classes()
        if classes is None:
            raise ValueError(f"PrototypeEvaluation: {model.name}.prototype_classes() returned None; the prototype "
                             "metrics need each prototype's class (a prototype network implements it)")
        classes = classes.cpu()
        return {"purity": PrototypePurity(len(classes), self.k), "knn_class_purity": KNNClassPurity(classes, self.k),
                "activation_precision": PrototypeActivationPrecision(
                    classes, self.percentile, model.localization_interpolation),
                "consistency": PrototypeConsistency(classes, 2, self.threshold),
                "stability": PrototypeStability(classes)}

    def update(self, model: InterpretableModel, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        """Update every metric whose inputs the output and batch hold.

        Args:
            model: The model that made ``outputs`` (its ``prototype_classes()`` and ``localization_interpolation``
                are read; stability runs it once more).
            outputs: Its :class:`~pellucid.models.ModelOutput` for ``batch["image"]``.
            batch: The batch.
            batch_idx: Index of the batch (seeds the stability noise).
        """
        if not self.metrics:
            self.metrics = self._fresh(model)
        maps = getattr(outputs, "prototype_maps", None)
        if maps is None or "mask" not in batch or batch["label"].ndim != 1:
            return
        maps, mask, labels = maps.detach().cpu(), batch["mask"].cpu(), batch["label"].cpu().long()
        feature_size = tuple(maps.shape[2:])
        on_lesion = patch_structure(mask, feature_size)
        if "lesion_type" in batch:
            self.metrics["purity"].update(maps, patch_structure(mask, feature_size, batch["lesion_type"].cpu()))
        self.metrics["knn_class_purity"].update(maps, labels)
        self.metrics["activation_precision"].update(maps, mask, labels)
        self.metrics["consistency"].update(maps, on_lesion, labels)
        if self.noise_std > 0:
            image = batch["image"]
            generator = torch.Generator(device=image.device).manual_seed(batch_idx)
            noise = torch.randn(image.shape, generator=generator, device=image.device, dtype=image.dtype)
            noisy = model(image + self.noise_std * noise, explain=True).prototype_maps.detach().cpu()
            self.metrics["stability"].update(maps, noisy, on_lesion, labels)

    def results(self) -> dict[str, float]:
        """Compute every metric that saw data, then reset them all."""
        values = {name: float(metric.compute()) for name, metric in self.metrics.items() if metric.update_called}
        if "purity" in values:
            values["structures_shown"] = float(self.metrics["purity"].structures_shown())
        for metric in self.metrics.values():
            metric.reset()
        return values

    def _log(self, stage: str, pl_module: pl.LightningModule) -> None:
        for name, value in self.results().items():
            pl_module.log(f"{stage}/prototype_{name}", value, sync_dist=False)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Update from a validation batch."""
        if "val" in self.stages and not trainer.sanity_checking:
            self.update(pl_module.model, outputs, batch, batch_idx)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the validation values."""
        if "val" in self.stages and not trainer.sanity_checking:
            self._log("val", pl_module)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                          batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Update from a test batch."""
        if "test" in self.stages:
            self.update(pl_module.model, outputs, batch, batch_idx)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the test values."""
        if "test" in self.stages:
            self._log("test", pl_module)
