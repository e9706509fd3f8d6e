"""Weights & Biases explanation logging: overlays, prototypes, concept tables, curves and the five-element metrics.

Every ``every_n_epochs`` validation epochs (and after testing), for a fixed set of samples (the first
``num_samples`` ids of the validation data, or ``sample_ids``), :class:`WandbExplanationLogger` logs:

- ``explain/overlay/<id>``: image, evidence heatmap (the predicted class's ``localization``) and ground-truth contours
  (lesion mask, shortcut marker); 3D inputs as the three orthogonal slices through the evidence peak;
- ``explain/prototypes/<id>``: where the most similar prototypes activate (models with ``prototype_maps``);
- ``explain/concepts``: a table of predicted versus true concepts with units (models with ``concept_logits``);
- ``explain/curve/<name>``: deletion and intervention curves, ``five/<element>/<metric>`` scalars and a
  ``five/definitions`` table (each value beside its registered definition, unit and direction), all from the
  five-element results the :class:`~pellucid.training.elements.callback.FiveElementMetrics` callback publishes on the
  module (:func:`~pellucid.training.elements.results.published_results`): this logger never looks the other
  callback up.

Offline by default: the run lives under ``<save_dir>/wandb/offline-run-*`` and is uploaded later with ``wandb sync``.
``mode="online"`` (or ``WANDB_MODE=online``) logs live; initialisation then gives up after ``init_timeout`` seconds and
falls back to offline with a warning, so a missing network never blocks or hangs training. When the trainer already
has a ``WandbLogger``, its run is used instead of a new one. Only global rank 0 logs; under DDP every process keeps
the followed samples of its own shard and rank 0 gathers them before logging, so the same samples are shown as in a
single-process run (the first ``num_samples`` of the unshuffled validation data, or every id in ``sample_ids``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_warn

from pellucid.models import ModelOutput
from pellucid.models.concepts import as_concept_spec
from pellucid.training.elements.families import concept_specs
from pellucid.training.elements.localization import evidence_maps
from pellucid.training.elements.results import FiveElementResults, published_results
from pellucid.training.outputs import figures
from pellucid.training.outputs.writer import safe_name

WandbMode = Literal["offline", "online", "disabled"]
_BATCH_KEYS = ("image", "mask", "confounder_mask", "concepts", "label")


def init_run(save_dir: str | Path, project: str = "pellucid", name: str | None = None,
             mode: WandbMode | None = None, init_timeout: float = 20.0) -> Any:
    """Start a W&B run under ``<save_dir>/wandb``: offline unless asked otherwise, never stuck without a network.

    Args:
        save_dir: Folder that receives ``wandb/``.
        project: W&B project.
        name: Run name.
        mode: ``"offline"``, ``"online"`` or ``"disabled"``; default ``WANDB_MODE``, else ``"offline"``.
        init_timeout: Seconds an online start may take; on failure (no network, no API key) the run starts
            offline instead, with a warning.

    Returns:
        The ``wandb`` run.
    """
    import wandb  # imported on first use: only needed when something is logged

    mode = mode or os.environ.get("WANDB_MODE") or "offline"
    if mode not in ("offline", "online", "disabled"):
        raise ValueError(f"W&B mode must be 'offline', 'online' or 'disabled', got {mode!r}")
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    options = dict(project=project, name=name, dir=str(save_dir), reinit="create_new")
    settings = wandb.Settings(init_timeout=init_timeout, silent=True, x_disable_stats=True, console="off")
    try:
        return wandb.init(mode=mode, settings=settings, **options)
    except (wandb.errors.CommError, wandb.errors.UsageError) as error:
        if mode != "online":
            raise
        rank_zero_warn(f"W&B online initialisation failed ({error}); logging offline under {save_dir}/wandb "
                       "instead (upload later with `wandb sync`)")
        return wandb.init(mode="offline", settings=settings, **options)


class WandbExplanationLogger(pl.Callback):
    """Log explanations of a fixed set of samples to Weights & Biases (see the module docstring).

    Args:
        every_n_epochs: Validation epochs between logs.
        num_samples: Samples followed when ``sample_ids`` is not given (the first ones validation yields).
        sample_ids: Ids of the samples to follow.
        log_test: Also log after testing.
        project: W&B project of a new run.
        name: W&B run name of a new run.
        save_dir: Folder that receives ``wandb/`` (default: the trainer's ``default_root_dir``).
        mode: ``"offline"``, ``"online"`` or ``"disabled"``; default ``WANDB_MODE``, else ``"offline"``.
        init_timeout: Seconds an online initialisation may take before falling back to offline.
        top_k_prototypes: Prototypes shown per sample.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_samples: int = 4,
        sample_ids: Sequence[str] | None = None,
        log_test: bool = True,
        project: str = "pellucid",
        name: str | None = None,
        save_dir: str | None = None,
        mode: WandbMode | None = None,
        init_timeout: float = 20.0,
        top_k_prototypes: int = 3,
    ) -> None:
        if every_n_epochs < 1 or num_samples < 1:
            raise ValueError(f"WandbExplanationLogger: every_n_epochs and num_samples must be >= 1, "
                             f"got {every_n_epochs} and {num_samples}")
        mode = mode or os.environ.get("WANDB_MODE") or "offline"
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"WandbExplanationLogger: mode must be 'offline', 'online' or 'disabled', got {mode!r}")
        self.every_n_epochs, self.num_samples, self.log_test = every_n_epochs, num_samples, log_test
        self.sample_ids = list(sample_ids) if sample_ids is not None else None
        self.project, self.name, self.save_dir, self.mode = project, name, save_dir, mode
        self.init_timeout, self.top_k_prototypes = init_timeout, top_k_prototypes
        self.run: Any = None
        self._own_run = False
        self._warned = False
        self._samples: dict[str, dict[str, dict[str, Any]]] = {"val": {}, "test": {}}  # stage -> id -> entry

    # ------------------------------------------------------------------------------------------------ run
    def _experiment(self, trainer: pl.Trainer) -> Any:
        """The W&B run: the trainer's ``WandbLogger`` run, else one of our own (created once)."""
        if self.run is not None:
            return self.run
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self.run = logger.experiment
                return self.run
        self.run = init_run(Path(self.save_dir or trainer.default_root_dir), project=self.project, name=self.name,
                            mode=self.mode, init_timeout=self.init_timeout)
        self._own_run = True
        return self.run

    def _finish(self) -> None:
        if self._own_run and self.run is not None:
            self.run.finish()
        self.run, self._own_run = None, False

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Close the run this callback opened (a ``WandbLogger``'s run is left to the logger)."""
        self._finish()

    # ---------------------------------------------------------------------------------------- collection
    def _logging_now(self, trainer: pl.Trainer, stage: str) -> bool:
        """Whether ``stage`` is logged now; the same answer on every process (collection and gathering need it)."""
        if trainer.sanity_checking:
            return False
        if stage == "test":
            return self.log_test
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _followed(self, sample_id: str, stage: str) -> bool:
        if self.sample_ids is not None:
            return sample_id in self.sample_ids
        followed = self._samples[stage]
        return sample_id in followed or len(followed) < self.num_samples

    def _collect(self, trainer: pl.Trainer, outputs: Any, batch: Any, stage: str) -> None:
        if not self._logging_now(trainer, stage) or not isinstance(outputs, ModelOutput):
            return
        ids = list(outputs.ids or batch["id"])
        chosen = []
        for index, sample_id in enumerate(ids):
            if self._followed(sample_id, stage):
                chosen.append(index)
                self._samples[stage].setdefault(sample_id, {})  # reserves its place among the followed
        if not chosen:
            return
        output = outputs.cpu()  # only batches holding a followed sample are copied
        maps = evidence_maps(output)
        for index in chosen:
            sample_id = ids[index]
            entry = {key: batch[key][index].detach().cpu() for key in _BATCH_KEYS if key in batch}
            entry["evidence"] = None if maps is None else maps[index]
            entry["output"] = {name: tensor[index] for name, tensor in output.tensors()}
            self._samples[stage][sample_id] = entry

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        """Keep the followed samples' inputs and explanations."""
        self._collect(trainer, outputs, batch, "val")

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        """Keep the followed samples' inputs and explanations."""
        self._collect(trainer, outputs, batch, "test")

    # --------------------------------------------------------------------------------------------- logging
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log after every callback's ``on_validation_epoch_end`` (so the five-element metrics are fresh)."""
        self._gather_and_log(trainer, pl_module, "val")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the test explanations and metrics."""
        self._gather_and_log(trainer, pl_module, "test")

    def _gather_and_log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self._logging_now(trainer, stage):
            return
        own = self._samples[stage]
        merged = self._gathered(trainer, own)  # collective: every process calls it
        if not trainer.is_global_zero:
            return
        self._samples[stage] = merged
        try:
            self.log_explanations(trainer, pl_module, stage)
        finally:
            self._samples[stage] = own  # each process keeps following the samples of its own shard

    def _gathered(self, trainer: pl.Trainer, own: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Every process's followed samples, merged in the data's order (the input itself on one process).

        The distributed sampler deals unshuffled samples round-robin (sample ``i`` to rank ``i % world_size``), so
        taking the processes' lists in turns restores the single-process order; ``num_samples`` of them are kept
        (all of them with ``sample_ids``).
        """
        if trainer.world_size < 2 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return own
        gathered: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, own)
        lists = [list(entries.items()) for entries in gathered]
        merged: dict[str, dict[str, Any]] = {}
        for position in range(max(len(entries) for entries in lists)):
            for entries in lists:
                if position < len(entries):
                    merged.setdefault(*entries[position])
        if self.sample_ids is None:
            merged = dict(list(merged.items())[: self.num_samples])
        return merged

    def log_explanations(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> dict[str, Any]:
        """Build and log the payload of ``stage``; returns it (keys as logged)."""
        import wandb

        payload: dict[str, Any] = {"epoch": trainer.current_epoch, "trainer/global_step": trainer.global_step}
        class_names = pl_module.hparams.get("class_names")
        model = getattr(pl_module, "model", pl_module)
        specs = [as_concept_spec(c) for c in concept_specs(model) or pl_module.hparams.get("concepts") or []]
        concept_table = wandb.Table(columns=["id", "concept", "unit", "predicted", "true"])
        for sample_id, entry in self._samples[stage].items():
            key, output = safe_name(sample_id), entry["output"]
            title = _title(sample_id, output.get("logits"), entry.get("label"), class_names)
            overlay = figures.overlay_figure(entry["image"], entry["evidence"], entry.get("mask"),
                                             entry.get("confounder_mask"), title)
            payload[f"{stage}/explain/overlay/{key}"] = wandb.Image(figures.figure_rgb(overlay), caption=title)
            if "prototype_maps" in output and "prototype_similarity" in output:
                gallery = figures.prototype_figure(entry["image"], output["prototype_maps"],
                                                   output["prototype_similarity"], self.top_k_prototypes, title)
                payload[f"{stage}/explain/prototypes/{key}"] = wandb.Image(figures.figure_rgb(gallery), caption=title)
            if "concept_logits" in output and specs and len(specs) == output["concept_logits"].shape[0]:
                for row in figures.concept_rows(output["concept_logits"], entry.get("concepts"), specs):
                    concept_table.add_data(sample_id, row["concept"], row["unit"], row["predicted"], row["true"])
        if concept_table.data:
            payload[f"{stage}/explain/concepts"] = concept_table
        payload.update(self._five_element_payload(pl_module, stage))
        self._experiment(trainer).log(payload)
        return payload

    def _five_element_payload(self, pl_module: pl.LightningModule, stage: str) -> dict[str, Any]:
        results = published_results(pl_module, stage)
        if results is None:
            if not self._warned:
                self._warned = True
                rank_zero_warn("WandbExplanationLogger: no five-element results were published for this stage; add "
                               "the FiveElementMetrics callback to log the five-element metrics and curves",
                               category=UserWarning)
            return {}
        return {**five_element_scalars(results, stage), **_curve_images(results, stage)}


def five_element_scalars(results: FiveElementResults, stage: str) -> dict[str, Any]:
    """``<stage>/five/<element>/<name>`` values and the ``<stage>/five/definitions`` table, from the same rows.

    Each row of the table is one registered metric with its value, so a value is never shown beside another
    metric's definition.
    """
    import wandb

    table = wandb.Table(columns=["element", "metric", "value", "unit", "higher_is_better", "definition"])
    payload: dict[str, Any] = {}
    for result in results.metrics:
        if result.value is None:
            continue
        payload[f"{stage}/five/{result.element}/{result.name}"] = result.value
        table.add_data(result.element, result.name, result.value, result.unit, result.higher_is_better,
                       result.definition)
    if table.data:
        payload[f"{stage}/five/definitions"] = table
    return payload


def _curve_images(results: FiveElementResults, stage: str) -> dict[str, Any]:
    import wandb

    curves: dict[str, dict[str, Any]] = {}
    for curve in results.curves:
        group = "intervention" if curve.name.startswith("intervention") else "deletion"
        curves.setdefault(group, {"curves": {}, "xlabel": curve.xlabel, "ylabel": curve.ylabel})
        curves[group]["curves"][curve.name] = (curve.x, curve.y)
    payload = {}
    for group, spec in curves.items():
        figure = figures.curve_figure(spec["curves"], spec["xlabel"], spec["ylabel"], f"{group} curve ({stage})")
        payload[f"{stage}/explain/curve/{group}"] = wandb.Image(figures.figure_rgb(figure))
    return payload


def _title(sample_id: str, logits: torch.Tensor | None, label: torch.Tensor | None,
           class_names: Sequence[str] | None) -> str:
    def name(index: int) -> str:
        return class_names[index] if class_names and index < len(class_names) else str(index)

    parts = [sample_id]
    if logits is not None:
        parts.append(f"predicted {name(int(logits.argmax()))}")
    if label is not None and label.ndim == 0:
        parts.append(f"true {name(int(label))}")
    return " · ".join(parts)
