"""The ``pellucid`` command.

- ``pellucid fit|validate|test|predict --config <yaml> [...]``: LightningCLI over :class:`InterpretableModule`
  and any :class:`PellucidDataModule` (named by ``class_path`` in the config). The model's ``spatial_dims``,
  ``in_channels``, ``num_classes``, ``task``, ``class_names`` and ``concepts`` are linked from the data module.
- ``pellucid zoo``: the registered models.
- ``pellucid demo [--config <yaml>] [overrides]``: train on the phantom benchmark, test the best checkpoint,
  print the metrics and where every artefact is.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from pellucid.models import list_models
from pellucid.models.registry import model_builder
from pellucid.training.data.base import PellucidDataModule
from pellucid.training.module import InterpretableModule

DEMO_CONFIG = "configs/experiments/blackbox_phantom2d.yaml"
LINKED_FROM_DATA = {"spatial_dims": "spatial_dims", "in_channels": "in_channels", "num_classes": "num_classes",
                    "task": "task", "class_names": "class_names", "concept_specs": "concepts"}


class PellucidCLI(LightningCLI):
    """LightningCLI wired for pellucid: data facts flow into the model; our optimizer setup is kept."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link the data module's facts into the model's constructor."""
        for source, target in LINKED_FROM_DATA.items():
            parser.link_arguments(f"data.{source}", f"model.{target}", apply_on="instantiate")


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


def print_zoo() -> None:
    """Print every registered model with the first line of its description."""
    names = list_models()
    width = max(len(n) for n in names)
    print(f"{'model':<{width}}  description")
    for name in names:
        doc = (model_builder(name).__doc__ or "").strip().splitlines()
        print(f"{name:<{width}}  {doc[0] if doc else ''}")


def run_demo(args: list[str]) -> None:
    """Fit on the phantom benchmark, test the best checkpoint and say where everything is."""
    if "--config" not in args:
        if not Path(DEMO_CONFIG).is_file():
            raise FileNotFoundError(f"demo config {DEMO_CONFIG!r} not found; run from the repository root "
                                    "or pass --config <file>")
        args = ["--config", DEMO_CONFIG, *args]
    cli = build_cli(args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    checkpoint = cli.trainer.checkpoint_callback.best_model_path if cli.trainer.checkpoint_callback else ""
    results = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=checkpoint or None)
    print("\npellucid demo finished")
    for key, value in sorted(results[0].items()):
        print(f"  {key:<28} {value:.4f}")
    print(f"  checkpoint: {checkpoint or '(checkpointing disabled)'}")
    print(f"  logs:       {cli.trainer.log_dir}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``pellucid`` console script."""
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    os.environ.setdefault("WANDB_MODE", "offline")
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["zoo"]:
        print_zoo()
    elif args[:1] == ["demo"]:
        run_demo(args[1:])
    else:
        build_cli(args)


if __name__ == "__main__":
    main()
