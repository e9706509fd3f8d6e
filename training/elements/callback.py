"""The five-element metrics: what pellucid measures about every explanation, from ``ModelOutput`` alone.

The five elements of interpretability for medical imaging (Wang et al., IEEE Access 12, 2024,
https://doi.org/10.1109/ACCESS.2024.3387702), each measured whenever the batch carries the ground truth it needs:

- localization: pointing game, energy inside the lesion mask, Dice/IoU of the thresholded map and activation
  precision of each sample's evidence map (its ``localization`` for the predicted class);
- visual recognizability: prototype purity against known lesion types and classes, prototype-map localization;
- physical attribution: concept accuracy and AUROC (binary concepts), absolute error in the concept's unit
  (continuous ones), concept-map localization;
- transparency: exact logit reconstruction from the explanation where the model is linear over it, head sparsity,
  deletion-curve faithfulness (the parameter-randomisation sanity check is in :mod:`pellucid.training.elements.sanity`);
- actionability: intervention gain and curve where the model accepts concept interventions; share of evidence on a
  known shortcut marker (``confounder_mask``), with a flag.

:class:`ExplanationEvaluator` holds torchmetrics ``Metric``s (they synchronise across DDP processes) and is fed
``(model, output, batch)``; :class:`FiveElementMetrics` is the Lightning callback around it. The report card runs
the same callback through ``Trainer.test``. In a config (with the W&B logger, which logs these metrics too)::

    trainer:
      callbacks:
        - class_path: pellucid.training.elements.callback.FiveElementMetrics
          init_args: {every_n_epochs: 2}
        - class_path: pellucid.training.outputs.wandb_logging.WandbExplanationLogger
          init_args: {every_n_epochs: 2, num_samples: 4}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl

from pellucid.models import ModelOutput
from pellucid.training.elements.counterfactual import twin_source
from pellucid.training.elements.evaluator import ExplanationEvaluator
from pellucid.training.elements.families import concept_specs
from pellucid.training.elements.results import (
    DEFAULT_DELETION_FRACTIONS,
    ELEMENT_TITLES,
    ELEMENTS,
    METRICS,
    Curve,
    FiveElementResults,
    MetricInfo,
    MetricResult,
    publish_results,
)
from pellucid.training.elements.transparency import DeletionBaseline, LinearExplanationHead

__all__ = [
    "DEFAULT_DELETION_FRACTIONS",
    "ELEMENTS",
    "ELEMENT_TITLES",
    "METRICS",
    "Curve",
    "ExplanationEvaluator",
    "FiveElementMetrics",
    "FiveElementResults",
    "LinearExplanationHead",
    "MetricInfo",
    "MetricResult",
]


class FiveElementMetrics(pl.Callback):
    """Compute and log the five-element metrics on validation (every ``every_n_epochs``) and test.

    Logged as ``<stage>/five/<element>/<metric>``; the latest :class:`FiveElementResults` of each stage are kept in
    :attr:`results` (read by the report card) and publishes them on the module (:func:`publish_results`, read by the W&B
    logger). Works for every model through ``ModelOutput``.

    Args:
        every_n_epochs: Validation epochs between evaluations (test always evaluates).
        stages: Stages to evaluate: ``"val"`` and/or ``"test"``.
        deletion_samples: Samples per process and evaluation that get deletion curves.
        deletion_fractions: Fractions of pixels deleted along the deletion curves.
        deletion_baseline: ``"mean"`` or ``"zero"``.
        prototype_top_k: ``k`` of prototype purity.
        shortcut_enrichment_threshold: ``shortcut_enrichment`` from which the shortcut is flagged.
        shortcut_tolerance: Pixels/voxels by which the shortcut marker is dilated before measuring.
        seed: Seed of the random intervention order.
        counterfactual_samples: Samples per process and evaluation that get counterfactual twins (phantom data only;
            each costs about 9 forward passes).
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        stages: Sequence[str] = ("val", "test"),
        deletion_samples: int = 64,
        deletion_fractions: Sequence[float] = DEFAULT_DELETION_FRACTIONS,
        deletion_baseline: DeletionBaseline = "mean",
        prototype_top_k: int = 5,
        shortcut_enrichment_threshold: float = 3.0,
        shortcut_tolerance: int = 2,
        seed: int = 0,
        counterfactual_samples: int = 512,
    ) -> None:
        unknown = sorted(set(stages) - {"val", "test"})
        if unknown or every_n_epochs < 1:
            raise ValueError(f"FiveElementMetrics: stages must be among ['test', 'val'] and every_n_epochs >= 1, "
                             f"got stages={list(stages)} every_n_epochs={every_n_epochs}")
        self.every_n_epochs, self.stages = every_n_epochs, tuple(stages)
        self.options = dict(deletion_samples=deletion_samples, deletion_fractions=deletion_fractions,
                            deletion_baseline=deletion_baseline, prototype_top_k=prototype_top_k,
                            shortcut_enrichment_threshold=shortcut_enrichment_threshold,
                            shortcut_tolerance=shortcut_tolerance, seed=seed,
                            counterfactual_samples=counterfactual_samples)
        self.results: dict[str, FiveElementResults] = {}
        self.evaluator: ExplanationEvaluator | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Build the evaluator for the module's task and concepts and the data's concept columns."""
        model = getattr(pl_module, "model", pl_module)
        self.evaluator = ExplanationEvaluator(
            task=getattr(pl_module, "task", "multiclass"),
            concept_specs=concept_specs(model) or pl_module.hparams.get("concepts"),
            data_concept_specs=getattr(trainer.datamodule, "concept_specs", None),
            twins=twin_source(trainer.datamodule),  # the phantom's counterfactual twins; None for other data
            **self.options)

    def active(self, trainer: pl.Trainer, stage: str) -> bool:
        """Whether ``stage`` ("val"/"test") is evaluated now."""
        if stage not in self.stages or trainer.sanity_checking or self.evaluator is None:
            return False
        return stage == "test" or (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.active(trainer, stage):
            self.evaluator.reset()
            self.evaluator.to(pl_module.device)

    def _batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, stage: str) -> None:
        if self.active(trainer, stage) and isinstance(outputs, ModelOutput):
            self.evaluator.update(getattr(pl_module, "model", pl_module), outputs, batch)

    def _end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.active(trainer, stage):
            return
        results = self.evaluator.compute()
        self.results[stage] = results
        publish_results(pl_module, stage, results)  # the W&B logger reads them from the module, not this callback
        for name, value in results.scalars(prefix=f"{stage}/five/").items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=True)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Reset for this validation epoch."""
        self._start(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Reset for this test run."""
        self._start(trainer, pl_module, "test")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        """Measure the batch's explanations."""
        self._batch(trainer, pl_module, outputs, batch, "val")

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        """Measure the batch's explanations."""
        self._batch(trainer, pl_module, outputs, batch, "test")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compute, keep and log the epoch's metrics."""
        self._end(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compute, keep and log the test metrics."""
        self._end(trainer, pl_module, "test")
