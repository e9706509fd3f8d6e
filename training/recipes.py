"""Turn a model family's recipe (:mod:`pellucid.models.recipe`, plain data) into the callbacks that run it.

:meth:`InterpretableModule.configure_callbacks` calls :func:`recipe_callbacks` for every ``fit``, whatever the data
module, so a fine-tune or a user's own data gets the family's whole method. The phases are fitted to the trainer's
epoch budget first (:func:`~pellucid.models.recipe.fit_phases`); push runs at the start of every phase marked
``push``, so a prototype network's fit always ends pushed onto the data it trained on, with a last-layer phase after
the last push.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl

from pellucid.models.recipe import Phase, PushOptions, Recipe, fit_phases
from pellucid.training.phases import PhaseSchedule
from pellucid.training.prototypes.pruning import PrototypePruning
from pellucid.training.prototypes.push import PrototypePush


def push_epochs(phases: Sequence[Phase]) -> list[int]:
    """The epochs at which a phase marked ``push`` starts."""
    starts, epoch = [], 0
    for phase in phases:
        if phase.push:
            starts.append(epoch)
        epoch += phase.epochs
    return starts


def push_callback(options: PushOptions, epochs: list[int]) -> PrototypePush:
    """The push callback for ``options``, pushing at the start of ``epochs``."""
    pruning = None if options.pruning is None else PrototypePruning(
        k=options.pruning.k, min_same_class=options.pruning.min_same_class,
        remove_duplicates=options.pruning.remove_duplicates, duplicate_tolerance=options.pruning.duplicate_tolerance)
    return PrototypePush(epochs=epochs, every_n_epochs=options.every_n_epochs, batch_size=options.batch_size,
                         pruning=pruning, within_mask=options.within_mask, unique=options.unique,
                         unique_sources=options.unique_sources)


def recipe_callbacks(recipe: Recipe, max_epochs: int | None,
                     existing: Sequence[pl.Callback] = ()) -> list[pl.Callback]:
    """The phase schedule and push callbacks that run ``recipe`` in ``max_epochs`` epochs.

    Args:
        recipe: The recipe (the family's, with the config's overrides).
        max_epochs: The trainer's epoch budget (``None`` or negative: the phases as written).
        existing: The trainer's own callbacks; listing a phase schedule or a push there as well is an error.

    Raises:
        ValueError: naming the duplicated callback and the fix.
    """
    callbacks: list[pl.Callback] = []
    phases = fit_phases(recipe.phases, max_epochs) if recipe.phases else []
    for kind, needed in ((PhaseSchedule, bool(phases)), (PrototypePush, recipe.pushes)):
        if needed and any(isinstance(callback, kind) for callback in existing):
            raise ValueError(f"trainer.callbacks lists a {kind.__name__} while the model's recipe has one: set its "
                             "options under model.recipe (phases, push) instead, or turn the recipe off with "
                             "model.recipe: off")
    if phases:
        callbacks.append(PhaseSchedule(phases))
    if recipe.pushes:
        callbacks.append(push_callback(recipe.push or PushOptions(), push_epochs(phases)))
    return callbacks
