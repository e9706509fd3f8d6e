"""The model registry: one decorator, one factory, one listing.

Variants are small builder functions (as in timm): each registered function takes ``spatial_dims``
first, fills in the variant's defaults and returns an :class:`~pellucid.models.base.InterpretableModel`.
Configs name models by their registry string.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import nn

ModelBuilder = TypeVar("ModelBuilder", bound=Callable[..., nn.Module])

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


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


def register_model(builder: ModelBuilder) -> ModelBuilder:
    """Register a model builder under its function name.

    The builder's first parameter must be ``spatial_dims``.

    Raises:
        ValueError: if the name is taken or the first parameter is not ``spatial_dims``.
    """
    name = builder.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered by {_REGISTRY[name].__module__}")
    parameters = list(inspect.signature(builder).parameters)
    if not parameters or parameters[0] != "spatial_dims":
        raise ValueError(f"model builder {name!r}: first parameter must be 'spatial_dims', got {parameters[:1]}")
    _REGISTRY[name] = builder
    return builder


def list_models(pattern: str | None = None) -> list[str]:
    """Return the sorted names of registered models, optionally only those containing ``pattern``."""
    names = sorted(_REGISTRY)
    return [n for n in names if pattern is None or pattern in n]


def model_builder(name: str) -> Callable[..., nn.Module]:
    """Return the builder registered as ``name``.

    Raises:
        UnknownModelError: naming the unknown model and the registered ones.
    """
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
    """
    builder = model_builder(name)
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    model = builder(spatial_dims, **kwargs)
    model.model_spec = ModelSpec(name=name, kwargs={"spatial_dims": spatial_dims, **kwargs})
    return model
