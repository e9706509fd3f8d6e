"""Localization of every attention gate against the lesion mask, per gate level, and the callback that logs it.

Any model that fills ``ModelOutput.attention`` gets these numbers: for gate ``i`` (the model's documented order)
the gate map is resized to the mask's size (bi/trilinear) and scored with the metrics of
:mod:`pellucid.training.elements.localization`: pointing game, energy inside the mask and Dice of the map thresholded at
0.5. The model's ``localization`` is scored the same way (for class maps, each sample's true class), so the
combined map can be compared with each level. Samples without lesion are skipped by every metric.

Logged names: ``<stage>/gate_<i>/<metric>`` and ``<stage>/localization/<metric>``, e.g. ``val/gate_0/pointing_game``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection

from pellucid.models.attention_gates import resize_to
from pellucid.models.output import ModelOutput
from pellucid.training.elements.localization import EnergyInsideMask, MaskDice, PointingGame, class_maps
from pellucid.training.elements.registry import register_metric

LOCALIZATION_KEY = "localization"
_GATE = "attention gate {level} (the model's documented order), resized to the mask's size"
register_metric("gate_{level}/pointing_game", "localization", f"Share of samples with a lesion whose {_GATE} peaks "
                "inside the lesion mask.", None, True)
register_metric("gate_{level}/energy_inside_mask", "localization", f"Share of the {_GATE}'s mass inside the lesion "
                "mask, mean over samples with a lesion.", None, True)
register_metric("gate_{level}/dice", "localization", f"Dice overlap of the {_GATE} thresholded at 0.5 with the lesion "
                "mask, mean over samples with a lesion.", None, True)


def localization_metrics(tolerance: int = 0, threshold: float = 0.5) -> MetricCollection:
    """Pointing game, energy inside the mask and Dice of the thresholded map, for one kind of map."""
    return MetricCollection(
        {"pointing_game": PointingGame(tolerance=tolerance), "energy_inside_mask": EnergyInsideMask(),
         "dice": MaskDice(threshold=threshold)},
        compute_groups=False,  # the three metrics share state names but not values
    )


class GateLocalization(nn.Module):
    """Localization metrics per gate level (and for the model's ``localization``), created on first use.

    The number of gates is read from the first output, so one instance serves any model; later outputs must have
    the same number of gates.

    Args:
        tolerance: Pointing-game tolerance in pixels/voxels (the mask is dilated by it).
        threshold: Map values ``>= threshold`` count as "pointed at" for Dice.
        include_localization: Also score ``ModelOutput.localization`` under the key ``localization``.
    """

    def __init__(self, tolerance: int = 0, threshold: float = 0.5, include_localization: bool = True) -> None:
        super().__init__()
        self.tolerance, self.threshold = tolerance, threshold
        self.include_localization = include_localization
        self.levels = nn.ModuleDict()

    def _metrics(self, key: str, device: torch.device) -> MetricCollection:
        if key not in self.levels:
            self.levels[key] = localization_metrics(self.tolerance, self.threshold).to(device)
        return self.levels[key]

    @torch.no_grad()
    def update(self, output: ModelOutput, mask: Tensor, classes: Tensor | None = None) -> None:
        """Score one batch.

        Args:
            output: The model's output; its ``attention`` maps (and ``localization``) are scored.
            mask: (B, 1, *S) ground truth; values > 0.5 are the lesion.
            classes: (B,) class per sample, to pick its map from a class-specific (B, K, *S) ``localization``.

        Raises:
            ValueError: if the number of gates changes between batches, or a class map is needed without
                ``classes``.
        """
        gates = output.attention or ()
        known = sum(1 for key in self.levels if key != LOCALIZATION_KEY)
        if known and gates and len(gates) != known:
            raise ValueError(f"GateLocalization: output has {len(gates)} attention gates, earlier outputs had {known}")
        size = mask.shape[2:]
        for index, gate in enumerate(gates):
            self._metrics(f"gate_{index}", gate.device).update(resize_to(gate.float(), size), mask)
        localization = output.localization
        if self.include_localization and localization is not None:
            if localization.shape[1] > 1 and classes is None:
                raise ValueError(f"GateLocalization: a class-specific localization {tuple(localization.shape)} "
                                 "needs each sample's class (classes=...)")
            maps = class_maps(localization, classes) if localization.shape[1] > 1 else localization[:, 0]
            self._metrics(LOCALIZATION_KEY, localization.device).update(maps.float(), mask)

    def compute(self) -> dict[str, Tensor]:
        """``{"gate_<i>/<metric>": value, "localization/<metric>": value}`` (NaN where no lesion was seen)."""
        results = {}
        for key, metrics in self.levels.items():
            for name, value in metrics.compute().items():
                results[f"{key}/{name}"] = value
        return results

    def reset(self) -> None:
        """Forget every batch seen so far (the levels are kept)."""
        for metrics in self.levels.values():
            metrics.reset()


def _sample_classes(output: ModelOutput, batch: Mapping[str, Any]) -> Tensor | None:
    """Each sample's true class for multi-class labels, else the predicted class, else None."""
    label = batch.get("label")
    if isinstance(label, Tensor) and label.ndim == 1:
        return label
    return output.logits.argmax(dim=1) if output.logits is not None else None


class GateLocalizationCallback(pl.Callback):
    """Log :class:`GateLocalization` per gate level at the end of each validation and test epoch.

    Reads the ``ModelOutput`` the validation/test steps return and the batch's ``mask``; batches without a mask
    and outputs without ``attention`` or ``localization`` are passed over.

    Args:
        tolerance: Pointing-game tolerance in pixels/voxels.
        threshold: Dice threshold on the maps.
        include_localization: Also log the model's ``localization`` under ``<stage>/localization/<metric>``.
    """

    def __init__(self, tolerance: int = 0, threshold: float = 0.5, include_localization: bool = True) -> None:
        super().__init__()
        self.options = {"tolerance": tolerance, "threshold": threshold, "include_localization": include_localization}
        self.metrics = {"val": GateLocalization(**self.options), "test": GateLocalization(**self.options)}
        self.last_results: dict[str, dict[str, float]] = {}

    def _update(self, stage: str, outputs: Any, batch: Mapping[str, Any]) -> None:
        if not isinstance(outputs, ModelOutput) or "mask" not in batch:
            return
        if outputs.attention is None and outputs.localization is None:
            return
        self.metrics[stage].update(outputs, batch["mask"], _sample_classes(outputs, batch))

    def _log(self, stage: str, pl_module: pl.LightningModule) -> None:
        results = self.metrics[stage].compute()
        self.metrics[stage].reset()
        if not results:
            return
        logged = {f"{stage}/{name}": value for name, value in results.items()}
        self.last_results[stage] = {name: float(value) for name, value in logged.items()}
        # values are already synchronised across processes by the torchmetrics states
        pl_module.log_dict(logged, on_step=False, on_epoch=True, sync_dist=False)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the epoch from empty metrics."""
        self.metrics["val"].reset()

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Score the batch's gate maps."""
        self._update("val", outputs, batch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log ``val/gate_<i>/<metric>``."""
        self._log("val", pl_module)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the epoch from empty metrics."""
        self.metrics["test"].reset()

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                          batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Score the batch's gate maps."""
        self._update("test", outputs, batch)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log ``test/gate_<i>/<metric>``."""
        self._log("test", pl_module)
