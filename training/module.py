"""``InterpretableModule``: the one LightningModule that trains every model in the zoo."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import MetricCollection

from pellucid.models import ConceptSpec, InterpretableModel, ModelOutput, check_parameter_groups, create_model
from pellucid.models.concept_layers import builder_takes_concepts
from pellucid.models.concepts import as_concept_spec
from pellucid.models.recipe import Phase, Recipe
from pellucid.models.registry import model_builder
from pellucid.training.data.base import Task
from pellucid.training.metrics import probabilities, task_metrics

OptimizerName = Literal["adamw", "adam", "sgd"]
RecipeChoice = Recipe | Literal["off"] | None
ScheduleName = Literal["constant", "cosine"]


def cosine_factor(step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Learning-rate factor: linear warm-up to 1 over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; training stops instead of carrying on with garbage."""


class InterpretableModule(pl.LightningModule):
    """Train, validate, test and predict with any registered model.

    The model is injected by registry name (plus keyword arguments), or as a model built by
    :func:`pellucid.models.create_model`; either way the checkpoint stores the name and arguments so
    ``InterpretableModule.load_from_checkpoint(path)`` rebuilds it by itself.

    The loss is the weighted sum of the model's ``loss_terms``; each term and the total are logged under
    ``train/``, ``val/`` and ``test/``. Validation, test and predict steps return the ``ModelOutput``
    (detached, with ``ids`` from the batch) for callbacks to consume.

    Args:
        model: Registry name (e.g. ``"blackbox"``) or a model made by ``create_model``.
        spatial_dims: 2 or 3 (linked from the data module by the CLI).
        in_channels: Image channels (linked from the data module).
        num_classes: Classes ``K`` (linked from the data module).
        task: ``"multiclass"``, ``"multilabel"`` or ``"segmentation"`` (linked from the data module); picks the
            task metrics (accuracy, balanced accuracy, AUROC; or Dice and IoU of ``segmentation`` against ``mask``).
        model_kwargs: Further keyword arguments for the model builder.
        class_names: Optional class names, kept in the checkpoint for reports.
        concepts: The data's concept specifications (linked from the data module). Passed to the model builder
            as ``concepts=`` when it is declared with ``@takes_concepts`` (concept models, see
            :func:`pellucid.models.concept_layers.takes_concepts`); kept in the checkpoint either way.
        lr: Learning rate of every parameter group not named in ``group_lr``.
        group_lr: Learning rate per parameter group name (e.g. ``{"head": 1e-2}``).
        weight_decay: Weight decay (decoupled for AdamW).
        optimizer: ``"adamw"``, ``"adam"`` or ``"sgd"`` (momentum 0.9).
        lr_schedule: ``"constant"``, or ``"cosine"`` (per step, to zero at the end of training); phases set the
            learning rates the schedule scales.
        warmup_fraction: Share of the training steps spent warming the learning rate up linearly (cosine only).
        loss_weights: Weight per loss term name, over the recipe's key by key; terms named nowhere weigh 1. A phase
            may override these.
        recipe: The model family's training method (:meth:`InterpretableModel.default_recipe`: phases, push,
            pruning, loss weights) is applied to any data by :meth:`configure_callbacks`. ``None`` (default): the
            family's recipe as it is; a :class:`~pellucid.models.recipe.Recipe`: replaces the fields it gives
            (``loss_weights`` merge key by key); ``"off"``: no recipe (every group trains throughout).
    """

    def __init__(
        self,
        model: str | InterpretableModel = "blackbox",
        spatial_dims: int | None = None,
        in_channels: int | None = None,
        num_classes: int | None = None,
        task: Task = "multiclass",
        model_kwargs: dict[str, Any] | None = None,
        class_names: list[str] | None = None,
        concepts: list[ConceptSpec] | None = None,
        lr: float = 1e-3,
        group_lr: dict[str, float] | None = None,
        weight_decay: float = 1e-4,
        optimizer: OptimizerName = "adamw",
        lr_schedule: ScheduleName = "constant",
        warmup_fraction: float = 0.0,
        loss_weights: dict[str, float] | None = None,
        recipe: RecipeChoice = None,
    ) -> None:
        super().__init__()
        if isinstance(model, str):
            missing = [n for n, v in (("spatial_dims", spatial_dims), ("in_channels", in_channels),
                                      ("num_classes", num_classes)) if v is None]
            if missing:
                raise ValueError(f"InterpretableModule(model={model!r}): {', '.join(missing)} must be given "
                                 "(the CLI links them from the data module)")
            extra = dict(model_kwargs or {})
            if concepts and builder_takes_concepts(model_builder(model)):
                extra.setdefault("concepts", [as_concept_spec(c) for c in concepts])
            built = create_model(model, spatial_dims, in_channels=in_channels, num_classes=num_classes, **extra)
        elif isinstance(model, InterpretableModel):
            built = model
            if getattr(model, "model_spec", None) is None:
                raise ValueError("InterpretableModule: pass a registry name, or a model made by create_model() "
                                 f"(it records how to rebuild it); got a bare {type(model).__name__}")
            for arg, value in (("spatial_dims", spatial_dims), ("in_channels", in_channels),
                               ("num_classes", num_classes)):
                if value is not None and value != getattr(model, arg):
                    raise ValueError(f"InterpretableModule: {arg}={value} disagrees with the model's "
                                     f"{arg}={getattr(model, arg)}")
        else:
            raise TypeError(f"InterpretableModule: model must be a registry name or an InterpretableModel, "
                            f"got {type(model).__name__}")
        self.model = built
        spec_kwargs = {k: v for k, v in built.model_spec.kwargs.items()
                       if k not in ("spatial_dims", "in_channels", "num_classes", "concepts")}
        self.save_hyperparameters(ignore=["model", "concepts", "recipe"])
        model_concepts = built.model_spec.kwargs.get("concepts", concepts)
        # plain dicts, so the checkpoint and hparams.yaml hold no custom classes
        self.hparams["concepts"] = [as_concept_spec(c).to_dict() for c in model_concepts] if model_concepts else None
        self.hparams.update(model=built.model_spec.name, spatial_dims=built.spatial_dims,
                            in_channels=built.in_channels, num_classes=built.num_classes,
                            model_kwargs=spec_kwargs or None)
        self.task = task
        self.groups = check_parameter_groups(built)
        self.recipe = resolve_recipe(built, recipe)
        # plain values, so checkpoints load weights-only and hparams.yaml stays readable
        self.hparams["recipe"] = "off" if recipe == "off" else (
            None if recipe is None else as_recipe(recipe).to_dict())
        unknown = sorted(set(group_lr or {}) - set(self.groups))
        if unknown:
            raise ValueError(f"group_lr names unknown parameter group(s) {unknown}; "
                             f"{built.name} has groups {sorted(self.groups)}")
        recipe_weights = self.recipe.loss_weights if self.recipe is not None else None
        self.loss_weights: dict[str, float] = {**(recipe_weights or {}), **(loss_weights or {})}
        _warn_overridden_weights(loss_weights or {}, self.recipe)
        self.phase_loss_weights: dict[str, float] = {}  # set by PhaseSchedule, wins over loss_weights
        self.current_phase: str | None = None
        self._frozen_norms: list[torch.nn.Module] = []
        self._checked_loss_names = False
        self._extra_loss_terms: list[tuple[tuple[str, ...], Callable[[InterpretableModel], dict[str, Tensor]]]] = []
        self.train_metrics = task_metrics(task, built.num_classes, prefix="train/", auroc=False)
        self.val_metrics = task_metrics(task, built.num_classes, prefix="val/")
        self.test_metrics = task_metrics(task, built.num_classes, prefix="test/")

    # ------------------------------------------------------------------------------------------ phases
    def check_phase(self, phase: Phase) -> None:
        """Raise ``ValueError`` when ``phase`` names a parameter group the model does not have."""
        named = set(phase.lr) | (set() if phase.train == "all" else set(phase.train))
        unknown = sorted(named - set(self.groups))
        if unknown:
            raise ValueError(f"phase {phase.name!r} names unknown parameter group(s) {unknown}; "
                             f"{self.model.name} has groups {sorted(self.groups)}")

    def enter_phase(self, phase: Phase) -> None:
        """Freeze/unfreeze parameter groups, set their learning rates and the loss weights for ``phase``.

        Learning rates are the phase's, else ``group_lr``'s, else ``lr``; under a schedule they become the rates the
        schedule scales from now on. Called by :class:`~pellucid.training.PhaseSchedule` at each epoch's start.
        """
        self.check_phase(phase)
        for name, params in self.groups.items():
            for param in params:
                param.requires_grad_(phase.trains(name))
        group_lr = self.hparams.get("group_lr") or {}
        trainer = self._trainer
        configs = trainer.lr_scheduler_configs if trainer is not None else []
        schedulers = {id(config.scheduler.optimizer): config.scheduler for config in configs}
        for optimizer in trainer.optimizers if trainer is not None else []:
            scheduler = schedulers.get(id(optimizer))
            for index, group in enumerate(optimizer.param_groups):
                name = group.get("name")
                if name is None:
                    continue
                base = phase.lr.get(name, group_lr.get(name, self.hparams.lr))
                if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                    scheduler.base_lrs[index] = base
                    group["lr"] = base * scheduler.lr_lambdas[index](scheduler.last_epoch)
                else:
                    group["lr"] = base
        self.phase_loss_weights = dict(phase.loss_weights)
        self._checked_loss_names = False  # the next step re-checks the phase's term names
        self.current_phase = phase.name
        self._frozen_norms = frozen_normalization(self.model, [name for name in self.groups if not phase.trains(name)],
                                                  self.groups)
        self.train(self.training)

    def train(self, mode: bool = True) -> InterpretableModule:
        """Set training mode; normalisation layers of frozen parameter groups stay in eval mode.

        A frozen group is frozen entirely: its batch-norm statistics stop updating too, so, e.g., prototypes pushed
        at the start of a last-layer phase stay equal to the latent patches they were projected onto.
        """
        super().train(mode)
        if mode:
            for norm in getattr(self, "_frozen_norms", ()):
                norm.eval()
        return self

    def configure_callbacks(self) -> list[pl.Callback]:
        """The recipe's callbacks for ``fit`` (phase schedule, push), fitted to ``trainer.max_epochs``.

        Raises:
            ValueError: when ``trainer.callbacks`` also lists a phase schedule or push while the recipe has them.
        """
        trainer = self._trainer
        if self.recipe is None or trainer is None or trainer.state.fn != "fit":
            return []
        from pellucid.training.recipes import recipe_callbacks  # the callbacks import this module

        return recipe_callbacks(self.recipe, trainer.max_epochs, trainer.callbacks)

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, image: Tensor, explain: bool = True) -> ModelOutput:
        """Run the model (see :meth:`InterpretableModel.forward`)."""
        return self.model(image, explain=explain)

    def add_loss_terms(self, names: Sequence[str],
                       terms: Callable[[InterpretableModel], dict[str, Tensor]]) -> None:
        """Add loss terms ``names`` that ``terms(model)`` computes at every training step (e.g. a callback's).

        They are weighted like the model's own terms (``loss_weights``, phases; default 1) and logged under ``train/``;
        validation and test leave them out. :class:`~pellucid.training.prototypes.corrections.PrototypeCorrections`
        adds ``forbid`` and ``keep`` this way.
        """
        self._extra_loss_terms.append((tuple(names), terms))

    def loss_weight(self, term: str) -> float:
        """Weight of loss term ``term`` now: phase override, then ``loss_weights``, then 1."""
        if term in self.phase_loss_weights:
            return self.phase_loss_weights[term]
        return self.loss_weights.get(term, 1.0)

    def compute_loss(self, output: ModelOutput, batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted sum of the model's loss terms, and the unweighted terms.

        Raises:
            NonFiniteLossError: naming the term and the global step when a term is NaN or infinite.
            ValueError: when ``loss_weights`` (or a phase) names a term the model does not make.
        """
        terms = self.model.loss_terms(output, batch)
        if self.training:
            for _, extra in self._extra_loss_terms:
                terms.update(extra(self.model))
        if not self._checked_loss_names:
            known = set(terms).union(*(names for names, _ in self._extra_loss_terms))
            unknown = sorted((set(self.loss_weights) | set(self.phase_loss_weights)) - known)
            if unknown:
                raise ValueError(f"loss weights name unknown loss term(s) {unknown}; "
                                 f"{self.model.name} makes {sorted(terms)}")
            self._checked_loss_names = True
        # one finiteness check (one device sync) for every term together; the term is named only when it fails
        values = torch.stack([value.detach().float().reshape(()) for value in terms.values()]) if terms else None
        if values is not None and not bool(torch.isfinite(values).all()):
            name, value = next((n, v) for n, v in zip(terms, values.tolist(), strict=True) if not math.isfinite(v))
            raise NonFiniteLossError(f"loss term {name!r} is {value} at global step {self.global_step} "
                                     f"(epoch {self.current_epoch}, phase {self.current_phase})")
        total = sum(self.loss_weight(name) * value for name, value in terms.items())
        return total, terms

    def _log_losses(self, stage: str, total: Tensor, terms: dict[str, Tensor], batch_size: int) -> None:
        """Epoch means reduced over every DDP process; training also logs each step's (local, unsynced) value."""
        values = {f"{stage}/loss": total, **{f"{stage}/loss_{name}": value for name, value in terms.items()}}
        if stage != "train":
            self.log(f"{stage}/loss", values.pop(f"{stage}/loss"), prog_bar=True, on_step=False, on_epoch=True,
                     batch_size=batch_size, sync_dist=True)
            self.log_dict(values, on_step=False, on_epoch=True, batch_size=batch_size, sync_dist=True)
            return
        # one all-reduce per name at the epoch's end instead of one per step: ``<name>_step`` stays local
        self.log_dict({f"{name}_step": value for name, value in values.items()}, on_step=True, on_epoch=False,
                      batch_size=batch_size)
        self.log_dict({f"{name}_epoch": value for name, value in values.items()}, on_step=False, on_epoch=True,
                      batch_size=batch_size, sync_dist=True)
        self.log("train/loss", total, prog_bar=True, on_step=True, on_epoch=False, logger=False, batch_size=batch_size)

    # ------------------------------------------------------------------------------------------- steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Forward without extra explanation work, weighted loss, metrics."""
        output = self.model(batch["image"], explain=False)
        total, terms = self.compute_loss(output, batch)
        batch_size = batch["image"].shape[0]
        self._log_losses("train", total, terms, batch_size)
        if self._update_task_metrics(self.train_metrics, output, batch):
            self.log_dict(self.train_metrics, on_step=False, on_epoch=True, batch_size=batch_size)
        return total

    def _update_task_metrics(self, metrics: MetricCollection, output: ModelOutput, batch: Mapping[str, Any]) -> bool:
        """Feed the task metrics when the output and the batch hold what they need; say whether they were fed."""
        if self.task == "segmentation":
            if output.segmentation is None or "mask" not in batch:
                return False
            metrics.update(output.segmentation.detach().argmax(dim=1), batch["mask"][:, 0].long())
        else:
            if output.logits is None:
                return False
            metrics.update(probabilities(output.logits.detach(), self.task), batch["label"].long())
        return True

    def _evaluate(self, stage: str, batch: dict[str, Any]) -> ModelOutput:
        output = self.model(batch["image"], explain=True)
        total, terms = self.compute_loss(output, batch)
        batch_size = batch["image"].shape[0]
        self._log_losses(stage, total, terms, batch_size)
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        if self._update_task_metrics(metrics, output, batch):
            self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=batch_size)
        output = output.detach()
        output.ids = list(batch["id"])
        return output

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> ModelOutput:
        """Loss, metrics; returns the explained, detached output with ``ids``."""
        return self._evaluate("val", batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> ModelOutput:
        """Loss, metrics; returns the explained, detached output with ``ids``."""
        return self._evaluate("test", batch)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> ModelOutput:
        """Explained, detached output with ``ids`` (labels are not needed)."""
        output = self.model(batch["image"], explain=True).detach()
        output.ids = list(batch["id"])
        return output

    # -------------------------------------------------------------------------------------- optimizers
    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        """One optimizer parameter group per model parameter group, named, each with its own learning rate.

        With ``lr_schedule="cosine"`` a per-step ``LambdaLR`` scales every group's learning rate.
        """
        optimizer = self._build_optimizer()
        if self.hparams.lr_schedule == "constant":
            return optimizer
        if self.hparams.lr_schedule != "cosine":
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.hparams.lr_schedule!r}")
        if not 0.0 <= self.hparams.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.hparams.warmup_fraction!r}")
        total = int(self.trainer.estimated_stepping_batches)
        factor = partial(cosine_factor, total_steps=total, warmup_steps=int(self.hparams.warmup_fraction * total))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _build_optimizer(self) -> torch.optim.Optimizer:
        group_lr = self.hparams.group_lr or {}
        param_groups = [
            {"params": params, "lr": group_lr.get(name, self.hparams.lr), "name": name}
            for name, params in self.groups.items() if params
        ]
        decay = self.hparams.weight_decay
        if self.hparams.optimizer == "adamw":
            return torch.optim.AdamW(param_groups, weight_decay=decay)
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(param_groups, weight_decay=decay)
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(param_groups, momentum=0.9, weight_decay=decay)
        raise ValueError(f"optimizer must be 'adamw', 'adam' or 'sgd', got {self.hparams.optimizer!r}")


def _warn_overridden_weights(loss_weights: Mapping[str, float], recipe: Recipe | None) -> None:
    """Warn when the recipe's phases set a term that ``loss_weights`` names to another value (the phase wins there)."""
    if recipe is None:
        return
    for term, weight in loss_weights.items():
        phases = [f"{phase.name} ({phase.loss_weights[term]:g})" for phase in recipe.phases
                  if term in phase.loss_weights and phase.loss_weights[term] != weight]
        if phases:
            rank_zero_warn(f"loss_weights['{term}'] = {weight:g} is overridden by the recipe's phase(s) "
                           f"{', '.join(phases)}, which set it themselves; to change it there, give the phases' "
                           f"loss_weights in model.recipe.phases (see the family's default_recipe)")


def as_recipe(recipe: Recipe | Mapping[str, Any]) -> Recipe:
    """A :class:`Recipe` from itself or its plain-value form (as checkpoints store it)."""
    return recipe if isinstance(recipe, Recipe) else Recipe.from_dict(dict(recipe))


def resolve_recipe(model: InterpretableModel, choice: RecipeChoice | Mapping[str, Any]) -> Recipe | None:
    """The recipe a fit applies: the family's, overridden field by field by ``choice``, or none for ``"off"``."""
    if choice == "off":
        return None
    override = None if choice is None else as_recipe(choice)
    family = model.default_recipe()
    if family is None:
        return override
    return family.overridden_by(override)


def frozen_normalization(model: torch.nn.Module, frozen: list[str],
                         groups: Mapping[str, list[torch.nn.Parameter]]) -> list[torch.nn.Module]:
    """Batch-norm layers with running statistics whose parameters all lie in the ``frozen`` groups."""
    frozen_ids = {id(param) for name in frozen for param in groups[name]}
    return [module for module in model.modules()
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats
            and (params := list(module.parameters(recurse=False)))
            and all(id(param) in frozen_ids for param in params)]
