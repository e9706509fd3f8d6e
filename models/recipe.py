"""A family's training method as plain data: phases, push and pruning, loss weights.

A model family says *what* its method is by returning a :class:`Recipe` from
:meth:`~pellucid.models.InterpretableModel.default_recipe`; ``pellucid.training`` says *how* to run it (the training
module turns a recipe into a phase schedule and a push callback for any data module). So a user's own dataset, or a
fine-tune from a shipped bundle, gets the same method as the benchmark. A config overrides a recipe field by field
(``model.recipe`` in YAML: any field given replaces the family's, ``loss_weights`` merge key by key) or turns it off
(``model.recipe: off``). Nothing here imports Lightning.

Phase lengths are in epochs for the recipe's own budget (the sum of its phases); :func:`fit_phases` stretches or
shrinks them to the trainer's ``max_epochs`` so that the method's last phase (for prototype networks: push, then the
last layer alone) always ends the fit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal


@dataclass
class Phase:
    """One stretch of training.

    Args:
        name: Shown in logs (``phase`` is logged as the phase's index).
        epochs: Length in epochs (>= 1), for the recipe's own budget (see :func:`fit_phases`).
        train: Parameter groups that train; ``"all"`` trains every group, the others are frozen.
        lr: Learning rate per group during the phase; groups not named keep the module's learning rate.
        loss_weights: Loss-term weights during the phase, overriding the module's ``loss_weights``.
        push: Project the prototypes onto their nearest training patches when the phase starts (prototype networks).
    """

    name: str
    epochs: int
    train: list[str] | Literal["all"] = "all"
    lr: dict[str, float] = field(default_factory=dict)
    loss_weights: dict[str, float] = field(default_factory=dict)
    push: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"phase {self.name!r}: epochs must be >= 1, got {self.epochs}")
        if isinstance(self.train, str) and self.train != "all":
            raise ValueError(f"phase {self.name!r}: train must be 'all' or a list of group names, got {self.train!r}")

    def trains(self, group: str) -> bool:
        """Whether ``group`` trains during this phase."""
        return self.train == "all" or group in self.train

    def same_settings(self, other: Phase) -> bool:
        """Whether ``other`` trains the same groups at the same rates with the same loss weights."""
        return (self.train, self.lr, self.loss_weights) == (other.train, other.lr, other.loss_weights)


@dataclass
class PruningOptions:
    """Prototype pruning after each push (ProtoPNet, Chen et al. 2019: k=6, at least 3 of the prototype's class).

    Args:
        k: Nearest training images (each counted once, by its closest patch) inspected per prototype.
        min_same_class: A prototype with fewer of its own class among the k is removed.
        remove_duplicates: Remove prototypes whose source patch duplicates another's, merging their weights.
        duplicate_tolerance: Largest latent distance at which two prototypes with one source count as duplicates.
    """

    k: int = 6
    min_same_class: int = 3
    remove_duplicates: bool = True
    duplicate_tolerance: float = 1e-6


@dataclass
class PushOptions:
    """How push runs (when it runs is the phases' ``push`` flag, or ``every_n_epochs``).

    Args:
        within_mask: In images whose ``mask`` marks a lesion, only lesion patches are candidates.
        unique: At most one prototype per training image (implies ``unique_sources``).
        unique_sources: No two prototypes take the same source patch (training image and latent cell): where several
            prototypes' nearest patch is one, the closest keeps it and the others take their nearest patch not yet
            taken (an exact greedy assignment by distance). On by default because a prototype *is* its patch: two
            prototypes on one patch are one prototype shown twice, and a bundle's gallery would show it twice. The
            original ProtoPNet (Chen et al. 2019) allows duplicates and merges them when pruning; ``false`` restores
            that. For a model that only finds sources (PIP-Net), no two prototypes are shown with one patch.
        every_n_epochs: Also push at the start of epochs N, 2N, ... (``None``: only when a push phase starts).
        batch_size: Push loader batch size (``None``: the data module's).
        pruning: Prune after each push (``None``: never).
    """

    within_mask: bool = False
    unique: bool = False
    unique_sources: bool = True
    every_n_epochs: int | None = None
    batch_size: int | None = None
    pruning: PruningOptions | None = None


@dataclass
class Recipe:
    """A family's training method, or a config's override of one (``None`` fields: keep the family's).

    Args:
        phases: The phases in order (``None``: no phases, every group trains throughout).
        push: Push options (needed when a phase pushes; prototype networks only).
        loss_weights: Weight per loss term (terms not named weigh 1). The module's ``loss_weights`` win key by key.
    """

    phases: list[Phase] | None = None
    push: PushOptions | None = None
    loss_weights: dict[str, float] | None = None

    def __post_init__(self) -> None:
        names = [phase.name for phase in self.phases or []]
        if len(set(names)) != len(names):
            raise ValueError(f"Recipe: phase names must be unique, got {names}")

    @property
    def pushes(self) -> bool:
        """Whether the recipe pushes prototypes at all."""
        return any(phase.push for phase in self.phases or []) or (
            self.push is not None and self.push.every_n_epochs is not None)

    def overridden_by(self, override: Recipe | None) -> Recipe:
        """This recipe with every field ``override`` gives replaced (``loss_weights`` merged key by key)."""
        if override is None:
            return self
        weights = {**(self.loss_weights or {}), **(override.loss_weights or {})}
        return replace(self, phases=override.phases if override.phases is not None else self.phases,
                       push=override.push if override.push is not None else self.push,
                       loss_weights=weights or None)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (for checkpoints and ``hparams.yaml``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Recipe:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming the valid ones."""
        _check_keys("Recipe", values, cls.__dataclass_fields__)
        phases = values.get("phases")
        push = values.get("push")
        if isinstance(push, dict):
            _check_keys("Recipe.push", push, PushOptions.__dataclass_fields__)
            pruning = push.get("pruning")
            if isinstance(pruning, dict):
                _check_keys("Recipe.push.pruning", pruning, PruningOptions.__dataclass_fields__)
                pruning = PruningOptions(**pruning)
            push = PushOptions(**{**push, "pruning": pruning})
        if phases is not None:
            for phase in phases:
                if isinstance(phase, dict):
                    _check_keys("Recipe.phases[]", phase, Phase.__dataclass_fields__)
            phases = [Phase(**phase) if isinstance(phase, dict) else phase for phase in phases]
        return cls(phases=phases, push=push, loss_weights=values.get("loss_weights"))


def _check_keys(where: str, values: dict[str, Any], valid: dict[str, Any]) -> None:
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(valid)}")


def _drop_to(phases: list[Phase], count: int) -> list[Phase]:
    """Keep at most ``count`` phases: drop the one before the last, merge neighbours with the same settings, repeat."""
    phases = list(phases)
    while len(phases) > count:
        del phases[-2]
        merged: list[Phase] = []
        for phase in phases:
            if merged and merged[-1].same_settings(phase):
                previous = merged[-1]
                merged[-1] = replace(previous, epochs=previous.epochs + phase.epochs, push=previous.push or phase.push)
            else:
                merged.append(phase)
        phases = merged
    return phases


def _allot(weights: list[int], total: int) -> list[int]:
    """Split ``total`` epochs in proportion to ``weights``, each at least 1 (largest remainder)."""
    share = [w * total / sum(weights) for w in weights]
    epochs = [max(1, int(s)) for s in share]
    order = sorted(range(len(weights)), key=lambda i: (share[i] - int(share[i]), weights[i]), reverse=True)
    index = 0
    while sum(epochs) < total:
        epochs[order[index % len(order)]] += 1
        index += 1
    while sum(epochs) > total:  # the minimum of 1 overshot: take from the longest phases
        longest = max(range(len(epochs)), key=lambda i: (epochs[i], -i))
        epochs[longest] -= 1
    return epochs


def fit_phases(phases: list[Phase], max_epochs: int | None) -> list[Phase]:
    """The recipe's phases fitted to a budget of ``max_epochs`` epochs; the last phase always ends the fit.

    A budget equal to the phases' sum keeps them as they are. Any other budget scales every phase in proportion
    (each at least one epoch). A budget shorter than the number of phases first drops phases from the one before the
    last backwards, merging neighbours that train the same way (a short fit keeps the method's start and its last
    phase: for a prototype network, push and then the last layer alone). ``None`` or a negative budget (training
    bounded by steps or time) keeps the phases unchanged; training then stays in the last phase.

    Raises:
        ValueError: when ``phases`` is empty or ``max_epochs`` is 0.
    """
    if not phases:
        raise ValueError("fit_phases: phases must not be empty")
    if max_epochs is None or max_epochs < 0 or max_epochs == sum(p.epochs for p in phases):
        return list(phases)
    if max_epochs == 0:
        raise ValueError("fit_phases: max_epochs must be >= 1")
    kept = _drop_to(phases, max_epochs)
    epochs = _allot([phase.epochs for phase in kept], max_epochs)
    return [replace(phase, epochs=count) for phase, count in zip(kept, epochs, strict=True)]
