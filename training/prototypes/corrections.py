"""Fine-tune a prototype model with a person's corrections: the forbid and keep losses of ProtoPDebug.

Bontempelli et al., "Concept-level Debugging of Part-Prototype Networks", ICLR 2023
(https://arxiv.org/abs/2205.15769). A corrections file (:mod:`pellucid.models.prototype_corrections`, written by
``pellucid review``) marks prototypes as *forbidden* (a shortcut) or *keep*. ``pellucid fit --init_from <model>
--corrections <file>`` adds :class:`PrototypeCorrections` to the trainer; at the start of the fit it reads each marked
prototype's source image from the training split (checking the sample id), and every training step adds two terms
to the loss (weights ``loss_weights.forbid`` / ``loss_weights.keep``, default 1):

- ``forbid``: the mean, over forbidden source patches, of the largest activation of any active prototype at that
  patch (``prototype_maps`` at the source cell). Patches like a forbidden prototype must not activate any prototype.
- ``keep``: minus the mean, over kept prototypes, of that prototype's activation at its own source patch (negated,
  as ``separation``: the term falls as the kept prototype keeps firing on its part).

Both re-embed the source images with the encoder as it is being fine-tuned (no stale vectors), through the output
contract's ``prototype_maps``, so they apply to every prototype family (ProtoPNet, cosine, XProtoNet, PIP-Net). The
correction forward keeps normalisation layers in eval mode: a few correction images must not shift the batch-norm
statistics. With the family's recipe, push re-projects the prototypes afterwards; the forbid term has by then moved
the marker's patches away from every prototype, so push does not land on them again.

The forbid term alone moves the *explanation* off a shortcut, not always the *decision*: a convolutional encoder
carries what it read at the marker into the cells around it, and on the shortcut phantom a ProtoPNet fine-tuned with
the forbid term alone still called 96 % of the marked test scans malignant, its evidence no longer on the marker
(``docs/benchmarks/correction_round.md``). So the forbidden places are also **shuffled** (``shuffle``, default 1):
the footprints of the forbidden cells in the image (with every flip and turn of them that the data module's
augmentation draws) are, in each training image with that probability, replaced by what lies at the same places in
another image of the batch, whatever its class. What sits there then no longer tells the label, and the loss makes
the model find other evidence: the counterfactual augmentation that shortcut studies use for the colour patches and
rulers of dermoscopy (Rieger et al., ICML 2020; Nauta et al., Diagnostics 2021). It reaches a shortcut at the places
a person marked; one that moves from image to image is left to the forbid term. ``--corrections_shuffle 0`` leaves
it out.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from pellucid.models.base import InterpretableModel
from pellucid.models.prototype_corrections import Correction, Corrections, CorrectionsError, read_corrections
from pellucid.training.prototypes.push_data import push_dataset

TERMS = ("forbid", "keep")


@dataclass
class CorrectionPatches:
    """The source images of one kind of mark, stacked, with the cell and the prototype of each.

    Attributes:
        images: (F, C, *S) source images from the training split.
        cells: (F, spatial_dims) latent cell of each source patch.
        prototypes: (F,) the marked prototype of each.
    """

    images: Tensor
    cells: Tensor
    prototypes: Tensor


def cell_region(cells: Tensor, cell_grid: tuple[int, ...], image_size: tuple[int, ...]) -> Tensor:
    """The cells' footprints in the image: the pixels (voxels) that a ``cell_grid`` over ``image_size`` gives them.

    Args:
        cells: (F, d) cell indices.
        cell_grid: The prototype maps' spatial size (d values).
        image_size: The image's spatial size (d values).

    Returns:
        (*image_size) boolean mask, the union of the F footprints (ceil at the far edge when the grid does not
        divide the image).
    """
    region = torch.zeros(image_size, dtype=torch.bool)
    for cell in cells.tolist():
        region[tuple(slice(c * size // grid, -(-(c + 1) * size // grid))
                     for c, grid, size in zip(cell, cell_grid, image_size, strict=True))] = True
    return region


def shuffle_region(images: Tensor, region: Tensor, probability: float, generator: torch.Generator | None = None
                   ) -> Tensor:
    """Replace, in place, ``region`` of each image (with ``probability``) by the same region of another image.

    Args:
        images: (B, C, *S) training images, changed in place.
        region: (*S) boolean mask of the places to shuffle.
        probability: Chance that an image gets another's region.
        generator: Random numbers (the global generator when ``None``, which ``seed_everything`` seeds).

    Returns:
        (B,) the image whose region each image now holds (itself where nothing changed).
    """
    count = images.shape[0]
    donors = torch.randperm(count, generator=generator)
    keep = torch.rand(count, generator=generator) >= probability
    donors = torch.where(keep, torch.arange(count), donors)
    mask = region.to(images.device)
    images[:, :, mask] = images[:, :, mask][donors.to(images.device)]  # copies the region only
    return donors


@contextmanager
def frozen_statistics(model: nn.Module) -> Iterator[None]:
    """Normalisation layers with running statistics in eval mode for the block, then as they were."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.training]
    for norm in norms:
        norm.eval()
    try:
        yield
    finally:
        for norm in norms:
            norm.train()


def cell_values(maps: Tensor, cells: Tensor) -> Tensor:
    """(F, P, *s) maps and (F, d) cells -> (F, P) each map's value at its sample's cell."""
    index = torch.zeros_like(cells[:, 0])
    for axis, size in enumerate(maps.shape[2:]):  # row-major flat index, as flatten(2) lays the cells out
        index = index * size + cells[:, axis]
    flat = maps.flatten(2)
    return flat.gather(2, index.view(-1, 1, 1).expand(-1, flat.shape[1], 1)).squeeze(2)


def correction_terms(model: InterpretableModel, forbid: CorrectionPatches | None, keep: CorrectionPatches | None
                     ) -> dict[str, Tensor]:
    """The ``forbid`` and ``keep`` terms (see the module docstring) for the marks present.

    Raises:
        CorrectionsError: when the model gives no ``prototype_maps`` or a source cell lies outside them.
    """
    groups = {name: patches for name, patches in zip(TERMS, (forbid, keep), strict=True) if patches is not None}
    if not groups:
        return {}
    images = torch.cat([patches.images for patches in groups.values()])
    with frozen_statistics(model):
        maps = model(images, explain=True).prototype_maps
    if maps is None:
        raise CorrectionsError(f"--corrections: {model.name} gives no prototype_maps; corrections apply to prototype "
                               "models (protopnet, protopnet_cosine, xprotonet, pipnet)")
    cells = torch.cat([patches.cells for patches in groups.values()]).to(maps.device)
    size = torch.tensor(maps.shape[2:], device=cells.device)
    if bool(((cells < 0) | (cells >= size)).any()):
        raise CorrectionsError(f"--corrections: a source cell {cells.tolist()} lies outside the model's "
                               f"{tuple(maps.shape[2:])} prototype maps; the file was written for another architecture")
    values = cell_values(maps, cells)  # (F, P)
    active = _active(model, values.shape[1]).to(values.device)
    terms, start = {}, 0
    for name, patches in groups.items():
        block = values[start:start + patches.images.shape[0]]
        start += patches.images.shape[0]
        if name == "forbid":
            terms[name] = block.masked_fill(~active, float("-inf")).amax(dim=1).mean()
        else:
            own = block.gather(1, patches.prototypes.to(block.device).view(-1, 1)).squeeze(1)
            terms[name] = -own.mean()
    return terms


def _active(model: InterpretableModel, count: int) -> Tensor:
    """(P,) which prototypes are active (all, for a model without pruning), through the explanation protocol."""
    active = model.active_prototypes()
    return active if active is not None else torch.ones(count, dtype=torch.bool)


class PrototypeCorrections(pl.Callback):
    """Add the ``forbid`` and ``keep`` terms to each step; shuffle the forbidden places between training images.

    See the module docstring.

    Args:
        path: The corrections file.
        shuffle: Chance that a training image gets another image's content at the forbidden places (0: never).

    Raises:
        CorrectionsError: when ``shuffle`` is not in [0, 1].
    """

    def __init__(self, path: str | Path, shuffle: float = 1.0) -> None:
        if not 0.0 <= shuffle <= 1.0:
            raise CorrectionsError(f"--corrections_shuffle: expected a probability in [0, 1], got {shuffle}; 1 "
                                   "shuffles the forbidden places of every training image, 0 turns it off")
        self.path = Path(path)
        self.shuffle = shuffle
        self.forbid: CorrectionPatches | None = None
        self.keep: CorrectionPatches | None = None
        self.region: Tensor | None = None

    def check_model(self, model: InterpretableModel) -> Corrections:
        """Read the file against ``model`` (prototype count, spatial dims, architecture) before anything runs.

        Raises:
            CorrectionsError: naming the file and what does not fit.
        """
        classes = model.prototype_classes()
        if classes is None:
            raise CorrectionsError(f"--corrections {self.path}: {model.name} has no prototypes; corrections apply to "
                                   "prototype models (protopnet, protopnet_cosine, xprotonet, pipnet)")
        corrections = read_corrections(self.path, num_prototypes=len(classes), spatial_dims=model.spatial_dims)
        if corrections.model != model.name:
            raise CorrectionsError(f"--corrections {self.path}: field 'model': the file marks prototypes of "
                                   f"{corrections.model!r}, this fit trains {model.name!r}; fine-tune the reviewed "
                                   "model (--init_from it) or review this one")
        if not corrections.corrections:
            raise CorrectionsError(f"--corrections {self.path}: no prototype is marked; mark one in `pellucid review`")
        return corrections

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Read the marked source images from the training split and give the module the terms."""
        if stage != "fit":
            return
        corrections = self.check_model(pl_module.model)
        dataset = push_dataset(trainer)  # what push read: the provenance's sample_index points into it
        self.forbid = self._patches(corrections.marked("forbid"), dataset)
        self.keep = self._patches(corrections.marked("keep"), dataset)
        if self.forbid is not None and self.shuffle > 0:
            region = self._region(pl_module.model, self.forbid)
            augmentation = getattr(trainer.datamodule, "augmentation", None)
            orbit = getattr(augmentation, "orbit", None)
            self.region = orbit(region) if callable(orbit) else region
        pl_module.add_loss_terms(TERMS, self.terms)

    def _region(self, model: InterpretableModel, forbid: CorrectionPatches) -> Tensor:
        """The forbidden cells' footprints in the image, from the model's prototype-map grid."""
        device = next(model.parameters()).device
        with torch.no_grad(), frozen_statistics(model):
            maps = model(forbid.images[:1].to(device), explain=True).prototype_maps
        if maps is None:
            raise CorrectionsError(f"--corrections: {model.name} gives no prototype_maps; corrections apply to "
                                   "prototype models (protopnet, protopnet_cosine, xprotonet, pipnet)")
        return cell_region(forbid.cells, tuple(maps.shape[2:]), tuple(forbid.images.shape[2:]))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        """Shuffle the forbidden places between the batch's images (in place), each image with chance ``shuffle``.

        Raises:
            CorrectionsError: when the training images are not the size of the split the marks came from.
        """
        if self.region is None:
            return
        images = batch["image"]
        if tuple(images.shape[2:]) != tuple(self.region.shape):
            raise CorrectionsError(f"--corrections {self.path}: training images are {tuple(images.shape[2:])}, the "
                                   f"forbidden patches' source images {tuple(self.region.shape)}; the marked places "
                                   "cannot be found in them: set --corrections_shuffle 0")
        shuffle_region(images, self.region, self.shuffle)

    def _patches(self, marked: list[Correction], dataset: Any) -> CorrectionPatches | None:
        if not marked:
            return None
        images, cells = [], []
        for correction in marked:
            index = correction.source["sample_index"]
            if index >= len(dataset):
                raise CorrectionsError(f"--corrections {self.path}, prototype {correction.prototype}: field "
                                       f"'source.sample_index': expected an index below {len(dataset)} (this data's "
                                       f"training split), got {index}; fine-tune on the data the prototypes came from")
            sample = dataset[index]
            if str(sample["id"]) != str(correction.source["sample_id"]):
                raise CorrectionsError(f"--corrections {self.path}, prototype {correction.prototype}: field "
                                       f"'source.sample_id': training sample {index} is {sample['id']!r}, the file "
                                       f"expects {correction.source['sample_id']!r}; fine-tune on the data the "
                                       "prototypes came from")
            images.append(torch.as_tensor(sample["image"]))
            cells.append(list(correction.source["feature_index"]))
        return CorrectionPatches(torch.stack(images), torch.tensor(cells, dtype=torch.long),
                                 torch.tensor([c.prototype for c in marked], dtype=torch.long))

    def terms(self, model: InterpretableModel) -> dict[str, Tensor]:
        """The terms for one training step, on the model's device."""
        device = next(model.parameters()).device
        moved = [None if p is None else CorrectionPatches(p.images.to(device), p.cells.to(device), p.prototypes)
                 for p in (self.forbid, self.keep)]
        return correction_terms(model, *moved)
