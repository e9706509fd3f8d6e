"""Training phases: which parameter groups train, at what learning rate, with which loss weights.

One callback decides this epoch by epoch.

The same mechanism serves ProtoPNet (warm-up with the backbone frozen, joint, last-layer only),
concept bottlenecks (sequential/independent stages: concept encoder first, then the label head) and
fine-tuning (frozen backbone, then unfrozen at a lower learning rate). Phases are written in YAML::

    trainer:
      callbacks:
        - class_path: pellucid.training.PhaseSchedule
          init_args:
            phases:
              - {name: warmup, epochs: 2, train: [head], lr: {head: 3.0e-3}}
              - {name: joint, epochs: 8}
              - {name: last_layer, epochs: 2, train: [last_layer], loss_weights: {cluster: 0.0}}
            repeat_from: joint

Frozen groups get ``requires_grad=False`` (no gradient is computed or applied). Under DDP use the
``ddp_find_unused_parameters_true`` strategy when phases freeze groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytorch_lightning as pl
from torch.optim.lr_scheduler import LambdaLR

from pellucid.training.module import InterpretableModule


@dataclass
class Phase:
    """One stretch of training.

    Args:
        name: Shown in logs and read by other callbacks (e.g. push runs when ``last_layer`` starts).
        epochs: Length of the phase in epochs (>= 1).
        train: Parameter groups that train; ``"all"`` trains every group, the others are frozen.
        lr: Learning rate per group during the phase; groups not named keep the module's learning rate.
        loss_weights: Loss-term weights during the phase, overriding the module's ``loss_weights``.
    """

    name: str
    epochs: int
    train: list[str] | Literal["all"] = "all"
    lr: dict[str, float] = field(default_factory=dict)
    loss_weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"phase {self.name!r}: epochs must be >= 1, got {self.epochs}")
        if isinstance(self.train, str) and self.train != "all":
            raise ValueError(f"phase {self.name!r}: train must be 'all' or a list of group names, got {self.train!r}")

    def trains(self, group: str) -> bool:
        """Whether ``group`` trains during this phase."""
        return self.train == "all" or group in self.train


class PhaseSchedule(pl.Callback):
    """Switch parameter groups, learning rates and loss weights at epoch boundaries.

    The phase of an epoch depends only on the epoch number, so a resumed run lands in the right phase.
    After the last phase, training stays in it, or cycles back to ``repeat_from`` when given.

    Args:
        phases: The phases in order.
        repeat_from: Name of the phase to cycle back to after the last one (e.g. ``joint`` to alternate
            joint and last-layer training); ``None`` keeps the last phase.
    """

    def __init__(self, phases: list[Phase], repeat_from: str | None = None) -> None:
        if not phases:
            raise ValueError("PhaseSchedule: phases must not be empty")
        names = [p.name for p in phases]
        if len(set(names)) != len(names):
            raise ValueError(f"PhaseSchedule: phase names must be unique, got {names}")
        if repeat_from is not None and repeat_from not in names:
            raise ValueError(f"PhaseSchedule: repeat_from={repeat_from!r} is not a phase; phases are {names}")
        self.phases = list(phases)
        self.repeat_from = repeat_from

    def phase_at(self, epoch: int) -> Phase:
        """The phase that epoch ``epoch`` (0-based) belongs to."""
        start = 0
        for phase in self.phases:
            if epoch < start + phase.epochs:
                return phase
            start += phase.epochs
        if self.repeat_from is None:
            return self.phases[-1]
        first = [p.name for p in self.phases].index(self.repeat_from)
        cycle = self.phases[first:]
        offset = (epoch - start) % sum(p.epochs for p in cycle)
        for phase in cycle:
            if offset < phase.epochs:
                return phase
            offset -= phase.epochs
        raise AssertionError("unreachable: offset is within one cycle")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check every group a phase names exists, and apply the first epoch's phase."""
        module = self._module(pl_module)
        groups = set(module.groups)
        for phase in self.phases:
            named = set(phase.lr) | (set() if phase.train == "all" else set(phase.train))
            unknown = sorted(named - groups)
            if unknown:
                raise ValueError(f"phase {phase.name!r} names unknown parameter group(s) {unknown}; "
                                 f"{module.model.name} has groups {sorted(groups)}")
        self.apply(trainer, module, self.phase_at(trainer.current_epoch))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Apply the phase of the epoch that is starting."""
        phase = self.phase_at(trainer.current_epoch)
        self.apply(trainer, self._module(pl_module), phase)
        pl_module.log("phase", float([p.name for p in self.phases].index(phase.name)), on_step=False, on_epoch=True)

    def apply(self, trainer: pl.Trainer, module: InterpretableModule, phase: Phase) -> None:
        """Freeze/unfreeze groups, set learning rates and loss weights for ``phase``."""
        for name, params in module.groups.items():
            for param in params:
                param.requires_grad_(phase.trains(name))
        group_lr = module.hparams.get("group_lr") or {}
        schedulers = {id(c.scheduler.optimizer): c.scheduler for c in trainer.lr_scheduler_configs}
        for optimizer in trainer.optimizers:
            scheduler = schedulers.get(id(optimizer))
            for index, group in enumerate(optimizer.param_groups):
                name = group.get("name")
                if name is None:
                    continue
                base = phase.lr.get(name, group_lr.get(name, module.hparams.lr))  # the phase's, else the module's
                if isinstance(scheduler, LambdaLR):  # the schedule scales the phase's rate from now on
                    scheduler.base_lrs[index] = base
                    group["lr"] = base * scheduler.lr_lambdas[index](scheduler.last_epoch)
                else:
                    group["lr"] = base
        module.phase_loss_weights = dict(phase.loss_weights)
        module._checked_loss_names = False  # the next step re-checks the phase's term names
        module.current_phase = phase.name

    @staticmethod
    def _module(pl_module: pl.LightningModule) -> InterpretableModule:
        if not isinstance(pl_module, InterpretableModule):
            raise TypeError(f"PhaseSchedule needs an InterpretableModule, got {type(pl_module).__name__}")
        return pl_module
