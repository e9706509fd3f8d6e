"""Checked model options: a misspelled key, at any depth, is one error naming the model, the key path, the valid keys.

:func:`pellucid.models.create_model` checks its keyword arguments before it calls the builder
(:func:`build_with_checked_options`):

- the top level against the builder's signature. A builder that takes ``**kwargs`` is followed to the class it
  returns (its return annotation, as zoo builders forward their keyword arguments to that class) and that class's
  ``__init__``;
- a nested mapping of options for a part the model builds by name: ``backbone_kwargs`` against the backbone that
  ``backbone`` names (:func:`pellucid.models.backbones.backbone_options`).

Where the check stops, so that it never refuses a key the model would accept:

- a level whose signature takes ``**kwargs`` that cannot be followed (a builder without a class return annotation,
  one annotated with a class that has subclasses, such as :class:`~pellucid.models.base.InterpretableModel`, or a
  class whose ``__init__`` takes ``**kwargs`` itself) accepts any key;
- when the builder picks the backbone in its body (``{"backbone": "monai/resnet10", **kwargs}``) the backbone is not
  known before the call: :func:`~pellucid.models.backbones.create_backbone` checks ``backbone_kwargs`` as it starts,
  before the backbone is built, and this module re-raises that error naming the model and the key path;
- ``timm/<name>`` backbones: the keys are :class:`~pellucid.models.backbones.TimmBackbone`'s own, which is exact
  (it passes no other option to timm); whether timm knows ``<name>`` is timm's own check.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

# nested mapping -> the argument that names the part it configures (``backbone_kwargs`` configures ``backbone``)
NESTED_OPTIONS = {"backbone_kwargs": "backbone"}


class ModelOptionError(ValueError):
    """A model or backbone option that the model does not take.

    Attributes:
        model: Registry name of the model (``None`` while only the backbone factory knows of the error).
        path: Key path from the model's options down to the unknown key, e.g. ``("backbone_kwargs", "chanels")``.
        valid: The keys accepted at that level.
        owner: What takes the options at that level, e.g. ``"backbone 'monai/convnet'"`` (empty: the model itself).
    """

    def __init__(self, model: str | None, path: Iterable[str], valid: Iterable[str], owner: str = "") -> None:
        self.model, self.path, self.valid, self.owner = model, tuple(path), tuple(sorted(valid)), owner
        super().__init__(self._message())

    def __reduce__(self) -> tuple[type[ModelOptionError], tuple[Any, ...]]:
        return type(self), (self.model, self.path, self.valid, self.owner)

    @property
    def key_path(self) -> str:
        """The dotted key path, e.g. ``"backbone_kwargs.chanels"``."""
        return ".".join(self.path)

    def within(self, model: str | None = None, prefix: Iterable[str] = ()) -> ModelOptionError:
        """The same error named for ``model`` and with ``prefix`` put before its key path."""
        return ModelOptionError(model or self.model, (*prefix, *self.path), self.valid, self.owner)

    def _message(self) -> str:
        subject = f"model {self.model!r}" if self.model else self.owner or "model"
        level = ".".join(self.path[:-1])
        where = f" ({self.owner})" if self.model and self.owner else ""
        close = difflib.get_close_matches(self.path[-1], self.valid, n=1)
        hint = f"; did you mean {'.'.join([*self.path[:-1], close[0]])!r}?" if close else ""
        return (f"{subject}: unknown option {self.key_path!r}; valid keys{f' of {level}' if level else ''}{where}: "
                f"{', '.join(self.valid) or 'none'}{hint}")


def keyword_options(function: Callable[..., Any], skip: Iterable[str] = ()) -> tuple[frozenset[str], bool]:
    """The keyword arguments ``function`` accepts, less ``skip``, and whether it also takes ``**kwargs``."""
    parameters = inspect.signature(inspect.unwrap(function)).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = frozenset(p.name for p in parameters if p.kind in kinds) - {"self", *skip}
    return names, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def returned_class(builder: Callable[..., Any]) -> type[nn.Module] | None:
    """The model class a builder's return annotation names, when it is specific enough to follow; else ``None``.

    Only a class without subclasses is followed: a builder annotated with a base class (``InterpretableModel``,
    ``nn.Module``, a family base) may build any subclass, whose ``__init__`` may take other keys.
    """
    function = inspect.unwrap(builder)
    try:
        annotation = inspect.get_annotations(function, eval_str=True).get("return")
    except Exception:  # an annotation that does not resolve: the check stops at this level
        return None
    if not (isinstance(annotation, type) and issubclass(annotation, nn.Module)) or annotation.__subclasses__():
        return None
    return annotation


def builder_options(builder: Callable[..., Any]) -> tuple[frozenset[str], bool]:
    """The options a model builder accepts (following ``**kwargs`` to its class), and whether any key is accepted.

    ``spatial_dims`` is not an option: :func:`~pellucid.models.create_model` passes it positionally.
    """
    names, is_open = keyword_options(builder, skip={"spatial_dims"})
    model_class = returned_class(builder) if is_open else None
    if model_class is None:
        return names, is_open
    class_names, class_open = keyword_options(model_class.__init__, skip={"spatial_dims"})
    return names | class_names, class_open


def check_model_options(name: str, builder: Callable[..., Any], kwargs: Mapping[str, Any]) -> None:
    """Refuse an option ``builder`` (registered as ``name``) does not take, at the top level or in a known mapping.

    Raises:
        ModelOptionError: naming the model, the key path and the valid keys at that level.
    """
    names, is_open = builder_options(builder)
    for key in kwargs:
        if not is_open and key not in names:
            raise ModelOptionError(name, (key,), names)
    for nested, selector in NESTED_OPTIONS.items():
        options = kwargs.get(nested)
        part = kwargs.get(selector, _signature_default(builder, selector))
        if isinstance(options, Mapping) and isinstance(part, str):
            _check_part(name, nested, part, options)


def _signature_default(builder: Callable[..., Any], parameter: str) -> Any:
    """The default of ``builder``'s own ``parameter``; ``None`` without one (the builder may choose in its body)."""
    found = inspect.signature(inspect.unwrap(builder)).parameters.get(parameter)
    return None if found is None or found.default is inspect.Parameter.empty else found.default


def _check_part(model: str, nested: str, part: str, options: Mapping[str, Any]) -> None:
    """Check the mapping ``nested`` against the part named ``part`` (today: a backbone)."""
    from pellucid.models.backbones import check_backbone_options  # backbones imports this module

    try:
        check_backbone_options(part, options)
    except ModelOptionError as error:
        raise error.within(model, prefix=(nested,)) from None


def build_with_checked_options(name: str, builder: Callable[..., nn.Module], spatial_dims: int,
                               kwargs: Mapping[str, Any]) -> nn.Module:
    """Check ``kwargs`` (:func:`check_model_options`), then build; an option error from inside names the model.

    Raises:
        ModelOptionError: one error naming the model, the key path and the valid keys at that level.
    """
    check_model_options(name, builder, kwargs)
    try:
        return builder(spatial_dims, **kwargs)
    except ModelOptionError as error:
        if error.model is not None:
            raise
        raise error.within(name, prefix=_mapping_holding(kwargs, error.path)) from None


def _mapping_holding(kwargs: Mapping[str, Any], path: tuple[str, ...]) -> tuple[str, ...]:
    """The key of the nested mapping in ``kwargs`` that holds ``path`` (where a part's error came from), if one does."""
    for nested in NESTED_OPTIONS:
        level = kwargs.get(nested)
        for key in path[:-1]:
            level = level.get(key) if isinstance(level, Mapping) else None
        if isinstance(level, Mapping) and path[-1] in level:
            return (nested,)
    return ()
