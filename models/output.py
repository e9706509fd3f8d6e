"""The one output contract every pellucid model returns, and its validator.

Every architecture returns a :class:`ModelOutput`. Callbacks, metrics, the explanation writer and the
report card read only this dataclass, so a new architecture gets all of them without extra code. A family's
loss-only tensors (what its ``loss_terms`` needs beyond the explanation) go in the one mapping ``aux``, under keys
the family documents in its module docstring; nothing outside the family reads them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor

# Fields that are not one tensor: ``attention`` holds a tuple of tensors, ``aux`` a mapping, ``ids`` metadata.
_NOT_TENSOR_FIELDS = ("attention", "aux", "ids")


class OutputContractError(ValueError):
    """A :class:`ModelOutput` breaks the contract (wrong shape, range or non-finite values)."""


@dataclass
class ModelOutput:
    """What every pellucid model returns. Fields are ``None`` unless the model makes them.

    Shapes use ``B`` batch, ``K`` classes, ``C`` segmentation channels, ``P`` prototypes, ``M`` concepts,
    ``*S`` the input's spatial size and ``*s`` a feature-map size (``spatial_dims`` axes each).

    Attributes:
        logits: (B, K) image-level class logits.
        segmentation: (B, C, *S) per-pixel/voxel logits (segmenters).
        localization: (B, K, *S) values in [0, 1]: where the evidence for each class lies, at input resolution;
            (B, 1, *S) when the model's evidence is class-agnostic (e.g. attention gates).
        prototype_similarity: (B, P) how strongly each prototype is present in each image.
        prototype_maps: (B, P, *s) similarity of each prototype at each feature location.
        concept_logits: (B, M) a logit per binary concept; a value in the concept's unit per continuous one.
        concept_maps: (B, M, *s) where each concept was read from.
        attention: one (B, 1, *s_l) map per attention gate, coarse to fine or in the model's documented order.
        ids: sample ids of the batch, set by the training module from ``batch["id"]`` (models leave it ``None``).
        aux: family-specific tensors only the family's loss terms read, each with the batch axis first, under keys
            the family documents (e.g. ``prototype_distances``); not part of the explanation contract, so
            :meth:`tensors`, :meth:`present`, the writer and the loggers ignore it; :meth:`apply` maps it too.
    """

    logits: Tensor | None = None
    segmentation: Tensor | None = None
    localization: Tensor | None = None
    prototype_similarity: Tensor | None = None
    prototype_maps: Tensor | None = None
    concept_logits: Tensor | None = None
    concept_maps: Tensor | None = None
    attention: tuple[Tensor, ...] | None = None
    ids: list[str] | None = field(default=None)
    aux: dict[str, Tensor] = field(default_factory=dict)

    def present(self) -> list[str]:
        """Names of the explanation-contract fields the model filled (``ids`` and ``aux`` excluded)."""
        return [f.name for f in fields(self) if f.name not in ("ids", "aux") and getattr(self, f.name) is not None]

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        """Yield ``(name, tensor)`` for every contract tensor present; attention gates as ``attention.<i>``.

        ``aux`` entries are left out: they are loss-only, and the readers of this method (validator, writer, W&B
        logger) handle the explanation contract only.
        """
        for name in TENSOR_FIELDS:
            value = getattr(self, name)
            if value is not None:
                yield name, value
        for index, gate in enumerate(self.attention or ()):
            yield f"attention.{index}", gate

    def apply(self, fn: Callable[[Tensor], Tensor]) -> ModelOutput:
        """Return a copy with ``fn`` applied to every tensor, ``aux`` entries included (e.g. ``detach``, ``cpu``)."""
        changes = {name: fn(getattr(self, name)) for name in TENSOR_FIELDS if getattr(self, name) is not None}
        if self.attention is not None:
            changes["attention"] = tuple(fn(gate) for gate in self.attention)
        changes["aux"] = {key: fn(value) for key, value in self.aux.items()}
        return replace(self, **changes)

    def detach(self) -> ModelOutput:
        """Return a copy with every tensor detached from the autograd graph."""
        return self.apply(lambda t: t.detach())

    def cpu(self) -> ModelOutput:
        """Return a detached copy with every tensor on the CPU."""
        return self.apply(lambda t: t.detach().cpu())


# Every field holding one tensor (or None), in declaration order: derived, so a new field cannot be forgotten.
TENSOR_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ModelOutput) if f.name not in _NOT_TENSOR_FIELDS)


def _fail(name: str, expected: str, actual: object) -> OutputContractError:
    return OutputContractError(f"ModelOutput.{name}: expected {expected}, got {actual}")


def validate_output(
    output: ModelOutput,
    image: Tensor,
    num_classes: int | None = None,
    num_prototypes: int | None = None,
    num_concepts: int | None = None,
) -> None:
    """Check that ``output`` honours the contract for the input ``image``.

    Args:
        output: What the model returned.
        image: The (B, C, *S) input the model was given.
        num_classes: Expected ``K`` for ``logits`` and ``localization``, if known.
        num_prototypes: Expected ``P``, if known.
        num_concepts: Expected ``M``, if known.

    Raises:
        OutputContractError: naming the field, the expected and the actual value.
    """
    if not isinstance(output, ModelOutput):
        raise OutputContractError(f"expected a ModelOutput, got {type(output).__name__}")
    if not isinstance(image, Tensor) or image.ndim < 3:
        raise OutputContractError(f"image: expected a (B, C, *S) tensor, got {getattr(image, 'shape', image)!r}")
    batch, spatial = image.shape[0], tuple(image.shape[2:])
    spatial_dims = len(spatial)
    if not output.present():
        raise OutputContractError("ModelOutput: every field is None; a model must fill at least one")

    for name, value in output.tensors():
        if not isinstance(value, Tensor):
            raise _fail(name, "a torch.Tensor", type(value).__name__)
        if value.ndim == 0:
            raise _fail(name, "a batch axis first", "a 0-dimensional tensor")
        if value.shape[0] != batch:
            raise _fail(name, f"batch size {batch} (first axis)", f"shape {tuple(value.shape)}")
    localization_in_range = _check_finite(output)

    def check_rank(name: str, value: Tensor, rank: int, layout: str) -> None:
        if value.ndim != rank:
            raise _fail(name, f"{rank} axes {layout}", f"shape {tuple(value.shape)}")

    def check_size(name: str, value: Tensor, axis: int, expected: int | None, what: str) -> None:
        if expected is not None and value.shape[axis] != expected:
            raise _fail(name, f"{what} = {expected} on axis {axis}", f"shape {tuple(value.shape)}")

    spatial_layout = "(B, ·, " + ", ".join("S" for _ in spatial) + ")"
    if output.logits is not None:
        check_rank("logits", output.logits, 2, "(B, K)")
        check_size("logits", output.logits, 1, num_classes, "K")
    if output.segmentation is not None:
        check_rank("segmentation", output.segmentation, 2 + spatial_dims, spatial_layout)
        if tuple(output.segmentation.shape[2:]) != spatial:
            raise _fail("segmentation", f"spatial size {spatial} (input resolution)", tuple(output.segmentation.shape))
    if output.localization is not None:
        loc = output.localization
        check_rank("localization", loc, 2 + spatial_dims, spatial_layout)
        if tuple(loc.shape[2:]) != spatial:
            raise _fail("localization", f"spatial size {spatial} (input resolution)", f"shape {tuple(loc.shape)}")
        classes = num_classes if num_classes is not None else (
            output.logits.shape[1] if output.logits is not None else None
        )
        if classes is not None and loc.shape[1] not in (classes, 1):
            raise _fail("localization", f"K = {classes} (or 1, class-agnostic) on axis 1", f"shape {tuple(loc.shape)}")
        if not localization_in_range:
            low, high = float(loc.min()), float(loc.max())
            raise _fail("localization", "values in [0, 1]", f"range [{low:.4g}, {high:.4g}]")
    if output.prototype_similarity is not None:
        check_rank("prototype_similarity", output.prototype_similarity, 2, "(B, P)")
        check_size("prototype_similarity", output.prototype_similarity, 1, num_prototypes, "P")
    if output.prototype_maps is not None:
        check_rank("prototype_maps", output.prototype_maps, 2 + spatial_dims, "(B, P, *s)")
        expected_p = num_prototypes if num_prototypes is not None else (
            output.prototype_similarity.shape[1] if output.prototype_similarity is not None else None
        )
        check_size("prototype_maps", output.prototype_maps, 1, expected_p, "P")
    if output.concept_logits is not None:
        check_rank("concept_logits", output.concept_logits, 2, "(B, M)")
        check_size("concept_logits", output.concept_logits, 1, num_concepts, "M")
    if output.concept_maps is not None:
        check_rank("concept_maps", output.concept_maps, 2 + spatial_dims, "(B, M, *s)")
        expected_m = num_concepts if num_concepts is not None else (
            output.concept_logits.shape[1] if output.concept_logits is not None else None
        )
        check_size("concept_maps", output.concept_maps, 1, expected_m, "M")
    if output.attention is not None:
        if not isinstance(output.attention, Sequence) or len(output.attention) == 0:
            raise _fail("attention", "a non-empty tuple of (B, 1, *s) tensors", type(output.attention).__name__)
        for index, gate in enumerate(output.attention):
            check_rank(f"attention.{index}", gate, 2 + spatial_dims, "(B, 1, *s)")
            check_size(f"attention.{index}", gate, 1, 1, "channels")
    if output.ids is not None and len(output.ids) != batch:
        raise _fail("ids", f"{batch} ids", f"{len(output.ids)}")
    _check_aux(output.aux, batch)


def _check_finite(output: ModelOutput) -> bool:
    """Raise naming the first field with NaN or infinite values; return whether ``localization`` lies in [0, 1].

    One device synchronisation for every field together (each field's verdict and the range's are reduced on the
    device and read at once); the offending field is counted, or the range read, only when a check fails.
    """
    named = [(name, value) for name, value in output.tensors() if value.is_floating_point() and value.numel()]
    loc = output.localization
    in_range = [((loc >= 0.0) & (loc <= 1.0)).all()] if loc is not None and loc.numel() else []
    if not named and not in_range:
        return True
    device = (named[0][1] if named else loc).device
    verdicts = torch.stack([flag.to(device=device, dtype=torch.float32)
                            for flag in [*(torch.isfinite(value).all() for _, value in named), *in_range]]).tolist()
    for (name, value), finite in zip(named, verdicts, strict=False):
        if not finite:
            count = int((~torch.isfinite(value)).sum())
            raise _fail(name, "finite values", f"{count} NaN or infinite value(s)")
    return bool(verdicts[-1]) if in_range else True


def _check_aux(aux: object, batch: int) -> None:
    """``aux`` is a mapping from string keys to tensors whose first axis is the batch."""
    if not isinstance(aux, Mapping):
        raise _fail("aux", "a dict of str -> (B, ...) tensors", type(aux).__name__)
    for key, value in aux.items():
        if not isinstance(key, str):
            raise _fail("aux", "string keys", f"key {key!r} of type {type(key).__name__}")
        if not isinstance(value, Tensor):
            raise _fail(f"aux[{key!r}]", "a torch.Tensor", type(value).__name__)
        if value.ndim == 0 or value.shape[0] != batch:
            raise _fail(f"aux[{key!r}]", f"batch size {batch} (first axis)", f"shape {tuple(value.shape)}")
