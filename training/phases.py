"""Training phases: which parameter groups train, at what learning rate, with which loss weights.

One callback decides this epoch by epoch, through the module's public :meth:`InterpretableModule.enter_phase`.

The same mechanism serves ProtoPNet (warm-up with the backbone frozen, joint, last-layer only), concept bottlenecks
(sequential/independent stages: concept encoder first, then the label head) and fine-tuning (frozen backbone, then
unfrozen at a lower learning rate). A family's phases come from its recipe (:mod:`pellucid.models.recipe`) and are
overridden in YAML under ``model.recipe.phases``; a model without a recipe may list the schedule itself::

    trainer:
      callbacks:
        - class_path: pellucid.training.PhaseSchedule
          init_args:
            phases:
              - {name: head_only, epochs: 2, train: [head], lr: {head: 3.0e-3}}
              - {name: full, epochs: 8}

Frozen groups get ``requires_grad=False`` (no gradient is computed or applied) and their batch-norm statistics stop
updating. Under DDP use the
``ddp_find_unused_parameters_true`` strategy when phases freeze groups.
"""

from __future__ import annotations

import pytorch_lightning as pl

from pellucid.models.recipe import Phase
from pellucid.training.module import InterpretableModule

__all__ = ["Phase", "PhaseSchedule"]


class PhaseSchedule(pl.Callback):
    """Enter the phase of each epoch at its start.

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
        """Check every group a phase names exists (the first phase is entered when its first epoch starts)."""
        module = self._module(pl_module)
        for phase in self.phases:
            module.check_phase(phase)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Enter the phase of the epoch that is starting."""
        phase = self.phase_at(trainer.current_epoch)
        self._module(pl_module).enter_phase(phase)
        pl_module.log("phase", float([p.name for p in self.phases].index(phase.name)), on_step=False, on_epoch=True)

    @staticmethod
    def _module(pl_module: pl.LightningModule) -> InterpretableModule:
        if not isinstance(pl_module, InterpretableModule):
            raise TypeError(f"PhaseSchedule needs an InterpretableModule, got {type(pl_module).__name__}")
        return pl_module
