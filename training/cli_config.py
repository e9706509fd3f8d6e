"""Layered configs and nested overrides of the model's mappings, merged key by key before jsonargparse sees them.

jsonargparse replaces a whole dict-valued argument when a later ``--config`` or a dotted override sets it; for the
model's mappings (``model_kwargs``, ``loss_weights``, ``group_lr``) :func:`merge_model_options` merges the ``model``
sections of the ``--config`` files, ``--model`` sections and ``--model.<mapping>[.<key>...]`` overrides in
command-line order (later wins key by key, lists are replaced, ``null`` resets) and hands jsonargparse one value per
mapping. :func:`model_option_problem` checks the merged options against the model (misspelled keys at any depth).
The rules, from a user's side, are in :mod:`pellucid.training.cli`.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonargparse import get_loader

from pellucid.models import ModelOptionError, UnknownModelError
from pellucid.models.options import check_model_options
from pellucid.models.registry import model_builder
from pellucid.training.module import InterpretableModule

CONFIG_FLAGS = ("--config", "-c")


def mapping_arguments() -> tuple[str, ...]:
    """The dict-valued arguments of :class:`InterpretableModule` (``model_kwargs``, ``group_lr``, ``loss_weights``)."""
    hints = typing.get_type_hints(InterpretableModule.__init__)
    return tuple(name for name, hint in hints.items()
                 if any(typing.get_origin(option) in (dict, Mapping) for option in (hint, *typing.get_args(hint))))


def deep_merge(base: Any, update: Any) -> Any:
    """``update`` over ``base``: mappings merge key by key, at every depth; anything else (a list too) replaces."""
    if not (isinstance(base, Mapping) and isinstance(update, Mapping)):
        return update
    merged = dict(base)
    for key, value in update.items():
        merged[key] = deep_merge(base[key], value) if key in base else value
    return merged


@dataclass
class ModelOptionLayers:
    """The dict-valued model arguments, merged in command-line order (see :func:`merge_model_options`).

    Attributes:
        mappings: Argument name (``model_kwargs``) -> its merged value.
        model: The last model name given (``model.model``), if any.
    """

    mappings: dict[str, Any] = field(default_factory=dict)
    model: str | None = None

    def add_section(self, source: str, section_key: str | None) -> None:
        """Merge a model section over what came before.

        Args:
            source: A YAML file, or inline YAML.
            section_key: ``"model"`` for a whole config (``--config``), ``None`` for a model section (``--model``).
        """
        path = Path(source)
        loaded = get_loader("yaml")(path.read_text() if path.is_file() else source)
        section = loaded.get(section_key) if section_key and isinstance(loaded, dict) else loaded
        if not isinstance(section, dict):
            return
        if isinstance(section.get("model"), str):
            self.model = section["model"]
        for name in mapping_arguments():
            if name in section:
                self.add(name, (), section[name])

    def add(self, name: str, keys: Sequence[str], value: Any) -> None:
        """Merge ``value`` at ``keys`` inside the mapping argument ``name`` over what came before."""
        for key in reversed(keys):
            value = {key: value}
        self.mappings[name] = deep_merge(self.mappings.get(name), value)

    def as_arguments(self) -> list[str]:
        """One ``--model.<name>=<JSON>`` per merged argument."""
        return [f"--model.{name}={json.dumps(value)}" for name, value in self.mappings.items()]


def _flag_value(args: Sequence[str], index: int) -> tuple[str, str | None, int]:
    """The flag at ``index``, its value (``--flag=value`` or ``--flag value``) and how many tokens they take."""
    flag, equals, value = args[index].partition("=")
    if equals:
        return flag, value, 1
    following = args[index + 1] if index + 1 < len(args) else None
    if following is None or following.startswith("--"):
        return flag, None, 1
    return flag, following, 2


def merge_model_options(args: Sequence[str]) -> tuple[list[str], ModelOptionLayers]:
    """Merge the dict-valued model arguments of every ``--config`` and ``--model.<argument>[.<key>...]`` in order.

    jsonargparse replaces a whole mapping: a later config's ``model_kwargs`` would drop an earlier one's keys, and
    ``--model.model_kwargs.backbone_kwargs.strides=...`` the config's other ``backbone_kwargs``. Here the later value
    wins key by key, at every depth (lists are replaced, not concatenated; ``null`` resets a mapping).

    Args:
        args: Command-line arguments after the subcommand.

    Returns:
        The arguments with the per-key overrides taken out and the merged values appended as one
        ``--model.<argument>=<JSON>`` each (the configs stay for everything else), and the merged layers.
    """
    layers, names, kept, index = ModelOptionLayers(), mapping_arguments(), [], 0
    while index < len(args):
        flag, value, width = _flag_value(args, index)
        keys = flag.removeprefix("--model.").split(".") if flag.startswith("--model.") else [""]
        if keys[0] in names and value is not None:  # taken out: it is part of the merged value appended below
            layers.add(keys[0], keys[1:], get_loader("yaml")(value))
            index += width
            continue
        if value is not None and flag in (*CONFIG_FLAGS, "--model"):
            layers.add_section(value, "model" if flag in CONFIG_FLAGS else None)
        elif value is not None and flag == "--model.model":
            layers.model = value
        kept.append(args[index])
        index += 1
    return kept + layers.as_arguments(), layers


def model_option_problem(layers: ModelOptionLayers) -> str | None:
    """Why the merged ``model.model_kwargs`` cannot build the named model (an unknown model or option), if so.

    Keys set to ``null`` are left out, as :func:`~pellucid.models.create_model` does. A backbone the model's builder
    picks in its body is only known when the model is built: its options are checked then
    (:meth:`PellucidCLI.instantiate_classes`).
    """
    if layers.model is None:
        return None
    kwargs = layers.mappings.get("model_kwargs")
    try:
        builder = model_builder(layers.model)
        if isinstance(kwargs, Mapping):
            check_model_options(layers.model, builder, {k: v for k, v in kwargs.items() if v is not None})
    except UnknownModelError as error:
        return f"model.model: {error}"
    except ModelOptionError as error:
        return str(error.within(prefix=("model", "model_kwargs")))
    return None
