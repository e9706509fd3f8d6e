"""The model registry: one decorator, one factory, one listing.

Variants are small builder functions (as in timm): each registered function takes ``spatial_dims``
first, fills in the variant's defaults and returns an :class:`~pellucid.models.base.InterpretableModel`.
Configs name models by their registry string.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from torch import nn

from pellucid.models.discovery import EntryPointError, load_entry_points
from pellucid.models.options import build_with_checked_options

ModelBuilder = TypeVar("ModelBuilder", bound=Callable[..., nn.Module])

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_EXPECTED_PARAMETERS: dict[str, dict[int, int]] = {}
# the entry points of other packages are loaded once, at the first look-up; a failure is kept and raised again
_ENTRY_POINTS: dict[str, Any] = {"loaded": False, "error": None}

# The configuration a declared parameter count refers to: the generic tests build every model this way.
COUNT_CONFIGURATION: dict[str, int] = {"in_channels": 1, "num_classes": 3}


class UnknownModelError(KeyError):
    """The requested model name is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


@dataclass(frozen=True)
class ModelSpec:
    """How a model was built: its registry name and the keyword arguments given to the builder.

    Attached to every model made by :func:`create_model` as ``model.model_spec`` so that a checkpoint
    can rebuild the same architecture by itself.
    """

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@overload
def register_model(builder: ModelBuilder, /) -> ModelBuilder: ...


@overload
def register_model(*, expected_parameters: Mapping[int, int] | None = None) -> Callable[[ModelBuilder], ModelBuilder]:
    ...


def register_model(builder: ModelBuilder | None = None, /, *,
                   expected_parameters: Mapping[int, int] | None = None) -> Any:
    """Register a model builder under its function name; bare (``@register_model``) or with arguments.

    The builder's first parameter must be ``spatial_dims``.

    Args:
        builder: The builder function (when used bare).
        expected_parameters: The model's trainable-parameter count per ``spatial_dims`` (2 and/or 3) when built by
            ``create_model(name, spatial_dims, in_channels=1, num_classes=3)`` (:data:`COUNT_CONFIGURATION`, the
            builder's defaults otherwise). The generic tests compare it, which catches an accidental architecture
            change; a model without it is tested for everything else.

    Example:
        ``@register_model(expected_parameters={2: 95_731, 3: 285_235})`` above ``def blackbox(spatial_dims, ...)``.

    Raises:
        ValueError: if the name is taken, the first parameter is not ``spatial_dims`` or a count is malformed.
    """
    counts = _checked_counts(expected_parameters)

    def register(function: ModelBuilder) -> ModelBuilder:
        name = function.__name__
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered by {_REGISTRY[name].__module__}")
        parameters = list(inspect.signature(function).parameters)
        if not parameters or parameters[0] != "spatial_dims":
            raise ValueError(f"model builder {name!r}: first parameter must be 'spatial_dims', got {parameters[:1]}")
        _REGISTRY[name] = function
        if counts:
            _EXPECTED_PARAMETERS[name] = counts
        return function

    return register(builder) if builder is not None else register


def _checked_counts(expected_parameters: Mapping[int, int] | None) -> dict[int, int]:
    """``expected_parameters`` as a plain dict after checking keys (2, 3) and values (positive integers)."""
    counts = dict(expected_parameters or {})
    for dims, count in counts.items():
        if dims not in (2, 3) or isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"register_model: expected_parameters maps spatial_dims 2 or 3 to a positive parameter "
                             f"count, got {dims!r}: {count!r}")
    return counts


def expected_parameters(name: str) -> dict[int, int]:
    """The trainable-parameter counts a model declared (``spatial_dims`` -> count); empty when it declared none."""
    model_builder(name)  # a clear error for an unknown name
    return dict(_EXPECTED_PARAMETERS.get(name, {}))


def load_plugins() -> None:
    """Load the entry points of the group ``pellucid.models`` once (other packages' models); later calls return.

    Raises:
        EntryPointError: naming the entry point and its package; raised again at every later call.
    """
    if _ENTRY_POINTS["error"] is not None:
        raise _ENTRY_POINTS["error"]
    if _ENTRY_POINTS["loaded"]:
        return
    _ENTRY_POINTS["loaded"] = True  # before loading: an entry point may itself list or create models
    try:
        load_entry_points()
    except EntryPointError as error:
        _ENTRY_POINTS["error"] = error
        raise


def list_models(pattern: str | None = None) -> list[str]:
    """Return the sorted names of registered models, optionally only those containing ``pattern``."""
    load_plugins()
    names = sorted(_REGISTRY)
    return [n for n in names if pattern is None or pattern in n]


def model_builder(name: str) -> Callable[..., nn.Module]:
    """Return the builder registered as ``name``.

    Raises:
        UnknownModelError: naming the unknown model and the registered ones.
    """
    load_plugins()
    if name not in _REGISTRY:
        raise UnknownModelError(f"unknown model {name!r}; registered models: {', '.join(list_models()) or 'none'}")
    return _REGISTRY[name]


def create_model(name: str, spatial_dims: int, **kwargs: Any) -> nn.Module:
    """Build a registered model.

    Keyword arguments that are ``None`` are dropped, so one config can drive models that accept
    different options (a builder's own default applies instead).

    Args:
        name: Registry name, e.g. ``"blackbox"``.
        spatial_dims: 2 or 3.
        **kwargs: Passed to the builder.

    Returns:
        The model, with ``model.model_spec`` recording how it was built.

    Raises:
        ModelOptionError: for an option the model (or its backbone) does not take, before it is built, naming the
            model, the key path and the valid keys (:mod:`pellucid.models.options`).
    """
    builder = model_builder(name)
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    model = build_with_checked_options(name, builder, spatial_dims, kwargs)  # ModelOptionError for a misspelled key
    model.model_spec = ModelSpec(name=name, kwargs={"spatial_dims": spatial_dims, **kwargs})
    return model
