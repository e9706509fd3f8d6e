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
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI

from pellucid.models import list_models
from pellucid.models.pretrained import list_bundles, read_metadata
from pellucid.models.registry import model_builder
from pellucid.training.bundle import export_bundle, initialise_from
from pellucid.training.data.base import PellucidDataModule
from pellucid.training.module import InterpretableModule

LINKED_FROM_DATA = {"spatial_dims": "spatial_dims", "in_channels": "in_channels", "num_classes": "num_classes",
                    "task": "task", "class_names": "class_names", "concept_specs": "concepts"}
MODEL_KWARGS = "model.model_kwargs"  # the dict-valued argument whose values may be mappings themselves


def nested_override_problems(args: Sequence[str]) -> list[str]:
    """Why each per-key override two levels inside a mapping argument would silently drop configured keys.

    jsonargparse applies ``--model.model_kwargs.backbone_kwargs.strides=[2, 2, 1]`` by replacing the whole
    ``backbone_kwargs`` mapping with ``{strides: [2, 2, 1]}``: the config file's other keys of it (``channels``)
    fall back to their defaults without a word. One level in (``--model.model_kwargs.prototypes_per_class=5``) is
    merged as expected, and a mapping passed whole (``--model.model_kwargs.backbone_kwargs="{...}"``) is used as
    written.
    """
    problems = []
    for arg in args:
        key = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        inner = key[len(MODEL_KWARGS) + 1:].split(".") if key.startswith(MODEL_KWARGS + ".") else []
        if len(inner) >= 2:
            mapping = ".".join([MODEL_KWARGS, *inner[:-1]])
            problems.append(f"--{key} would replace the whole {mapping} mapping by {{{inner[-1]}: ...}}, "
                            f"dropping the config's other keys of it; pass the mapping whole instead: "
                            f"--{mapping}=\"{{{inner[-1]}: ..., <its other keys>: ...}}\"")
    return problems


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
        """Parse as LightningCLI does, after refusing overrides that would silently drop configured keys.

        See :func:`nested_override_problems`.
        """
        listed = sys.argv[1:] if args is None else args
        if isinstance(listed, list | tuple):
            problems = nested_override_problems([str(arg) for arg in listed])
            if problems:
                parser.error("; ".join(problems))
        super().parse_arguments(parser, args)

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
        from pellucid.training.report import report_main  # on demand: the report pulls in matplotlib and W&B

        report_main(args[1:])
    else:
        build_cli(args)


if __name__ == "__main__":
    main()
