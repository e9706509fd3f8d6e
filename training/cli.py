"""The ``pellucid`` command.

- ``pellucid fit|validate|test|predict --config <yaml> [...]``: LightningCLI over :class:`InterpretableModule`
  and any :class:`PellucidDataModule` (named by ``class_path`` in the config). The model's ``spatial_dims``,
  ``in_channels``, ``num_classes``, ``task``, ``class_names`` and ``concepts`` are linked from the data module.
- ``pellucid fit ... --init_from <bundle name | folder | .safetensors | .ckpt>``: fine-tune from weights.
- ``pellucid zoo``: the registered models and the provided checkpoints with their headline metrics.
- ``pellucid export --ckpt <.ckpt> --name <name>``: write a checkpoint bundle.
- ``pellucid demo [--config <yaml>] [overrides]``: the whole story on the phantom benchmark (train ProtoPNet, predict
  with explanations, report card, offline W&B run) and where every artefact is (:mod:`pellucid.training.demo`).
- ``pellucid report --ckpt <checkpoint | zoo name> --data <yaml> --out <dir>``: the five-element report card.

Layered configs and nested overrides merge the model's dict-valued arguments (``model_kwargs``, ``loss_weights``,
``group_lr``) key by key, at every depth, in command-line order: ``--config mine.yaml --config
configs/model/protopnet.yaml`` keeps ``mine.yaml``'s ``mask_guidance: true`` and the keys of its ``backbone_kwargs``
that the later file does not set, and ``--model.model_kwargs.backbone_kwargs.strides=[2,2,1]`` keeps the config's
``channels``. The later value wins key by key; a list is replaced, not concatenated; a mapping given whole
(``--model.model_kwargs.backbone_kwargs="{...}"``) merges too, and ``null`` resets one
(``--model.model_kwargs.backbone_kwargs=null`` before it, to start from nothing). jsonargparse itself replaces a whole
mapping, so :func:`merge_model_options` merges the ``model`` sections of the ``--config`` files after the subcommand,
``--model`` sections and ``--model.<mapping>[.<key>...]`` overrides first, and hands it one value per mapping.
Everything else (trainer, data, scalar model arguments) is jsonargparse's: the later value replaces.

A misspelled model option, at any depth, is a usage error naming the model, the key path and the valid keys
(:mod:`pellucid.models.options`): at parse time (``--print_config`` too), or, for a backbone the model's builder picks
itself, as the model is built, before the backbone is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonargparse import Namespace, get_loader
from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI

from pellucid.models import ModelOptionError, UnknownModelError, list_models
from pellucid.models.options import check_model_options
from pellucid.models.pretrained import list_bundles, read_metadata
from pellucid.models.registry import model_builder
from pellucid.training.bundle import export_bundle, initialise_from
from pellucid.training.data.base import PellucidDataModule
from pellucid.training.module import InterpretableModule

LINKED_FROM_DATA = {"spatial_dims": "spatial_dims", "in_channels": "in_channels", "num_classes": "num_classes",
                    "task": "task", "class_names": "class_names", "concept_specs": "concepts"}
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


class PellucidCLI(LightningCLI):
    """LightningCLI wired for pellucid: data facts flow into the model; our optimizer setup is kept."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link the data module's facts into the model's constructor; add ``--init_from``."""
        for source, target in LINKED_FROM_DATA.items():
            parser.link_arguments(f"data.{source}", f"model.{target}", apply_on="instantiate")
        parser.add_argument("--init_from", type=str | None, default=None,
                            help="fine-tune: start from a zoo bundle name, a bundle folder, a .safetensors file or a "
                                 ".ckpt; layers whose shape changed keep their fresh initialisation")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse as LightningCLI does, after merging the dict-valued model arguments and checking the model's options.

        See :func:`merge_model_options`; an option the model does not take is a usage error naming it
        (:func:`model_option_problem`).
        """
        if isinstance(args, dict | Namespace):
            super().parse_arguments(parser, args)
            return
        listed = [str(arg) for arg in (sys.argv[1:] if args is None else args)]
        head = listed[:1] if listed[:1] and listed[0] in self.subcommands() else []
        merged, layers = merge_model_options(listed[len(head):])
        problem = model_option_problem(layers)
        if problem:
            parser.error(problem)
        self.config = parser.parse_args(head + merged)  # what LightningCLI does, less its warning on our own argv

    def instantiate_classes(self) -> None:
        """Instantiate as LightningCLI does; a model option error from the build is a usage error naming it."""
        try:
            super().instantiate_classes()
        except ModelOptionError as error:
            self.parser.error(str(error.within(prefix=("model", "model_kwargs"))))

    def before_fit(self) -> None:
        """Apply ``--init_from`` before training starts, and say what was copied and what was re-initialised."""
        source = self.config[self.subcommand].get("init_from") if self.subcommand else self.config.get("init_from")
        if source:
            for line in initialise_from(self.model, source):
                print(line)


def build_cli(args: list[str], run: bool = True) -> PellucidCLI:
    """Construct the CLI (``run=False`` parses and instantiates without running a subcommand)."""
    return PellucidCLI(
        InterpretableModule,
        PellucidDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,  # the module builds per-group optimizers itself
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


# metrics.json keys as benchmarks/build_zoo.py writes them (test split; element/metric from the report card)
HEADLINE_METRICS = {"test/accuracy": "accuracy", "test/balanced_accuracy": "balanced_accuracy", "test/dice": "dice",
                    "localization/pointing_game": "pointing_game",
                    "visual_recognizability/prototype_purity": "prototype_purity",
                    "physical_attribution/concept_accuracy": "concept_accuracy"}


def print_zoo() -> None:
    """Print every registered model, then every provided checkpoint with its headline metrics."""
    names = list_models()
    width = max(len(n) for n in names)
    print(f"{'model':<{width}}  description")
    for name in names:
        doc = (model_builder(name).__doc__ or "").strip().splitlines()
        print(f"{name:<{width}}  {doc[0] if doc else ''}")
    bundles = list_bundles()
    print(f"\n{len(bundles)} provided checkpoint(s)" + (":" if bundles else ""))
    for bundle in bundles:
        metadata = read_metadata(bundle)
        metrics = metadata.get("metrics", {})
        shown = ", ".join(f"{label} {metrics[key]:.3f}" for key, label in HEADLINE_METRICS.items()
                          if isinstance(metrics.get(key), int | float))
        print(f"  {metadata['name']:<28} {metadata['model']['name']} {metadata['spatial_dims']}D  {shown}")


def run_export(args: list[str]) -> None:
    """``pellucid export --ckpt <.ckpt> --name <name> [--out <folder>] [--config <yaml>] [--metrics <json>]``."""
    import json

    from pellucid.models.pretrained import checkpoints_dir
    from pellucid.training.checkpoint import load_checkpoint

    parser = argparse.ArgumentParser(prog="pellucid export", description="write a checkpoint bundle")
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint of an InterpretableModule")
    parser.add_argument("--name", required=True, help="zoo name of the bundle")
    parser.add_argument("--out", default=None, help="bundle folder (default: checkpoints/<name>)")
    parser.add_argument("--config", default=None, help="training config to keep with the bundle")
    parser.add_argument("--metrics", default=None, help="JSON file of measured metrics")
    parser.add_argument("--description", default="", help="one paragraph for the model card")
    options = parser.parse_args(args)
    module = load_checkpoint(options.ckpt)  # weights_only: no code from the file runs
    metrics = json.loads(Path(options.metrics).read_text()) if options.metrics else {}
    out = export_bundle(module, options.out or checkpoints_dir() / options.name, options.name,
                        description=options.description, config_path=options.config, metrics=metrics)
    print(f"bundle written: {out}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``pellucid`` console script."""
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    os.environ.setdefault("WANDB_MODE", "offline")
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["zoo"]:
        print_zoo()
    elif args[:1] == ["export"]:
        run_export(args[1:])
    elif args[:1] == ["demo"]:
        from pellucid.training.demo import run_demo  # on demand, as the report it runs

        run_demo(args[1:])
    elif args[:1] == ["report"]:
        from pellucid.training.outputs.report import report_main  # on demand: the report pulls in matplotlib and W&B

        report_main(args[1:])
    else:
        build_cli(args)


if __name__ == "__main__":
    main()
