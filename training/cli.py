"""The ``pellucid`` command.

- ``pellucid fit|validate|test|predict --config <yaml> [...]``: LightningCLI over :class:`InterpretableModule`
  and any :class:`PellucidDataModule` (named by ``class_path`` in the config). The model's ``spatial_dims``,
  ``in_channels``, ``num_classes``, ``task``, ``class_names`` and ``concepts`` are linked from the data module.
- ``pellucid fit ... --init_from <bundle name | folder | .safetensors | .ckpt>``: fine-tune from weights;
  ``--corrections <file>`` adds a person's prototype corrections (:mod:`pellucid.training.prototypes.corrections`).
- ``pellucid zoo``: the registered models and the provided checkpoints with their headline metrics.
- ``pellucid config [name]``: the shipped configs, or one printed; any argument ``zoo:<name>`` (``--config
  zoo:protopnet_phantom2d``) names a shipped config (:mod:`pellucid.training.shipped_configs`).
- ``pellucid --version``.
- ``pellucid export --ckpt <.ckpt> --name <name>``: write a checkpoint bundle; ``pellucid push <bundle> <owner/repo>``
  publishes one on the Hugging Face Hub (``hf://<owner>/<repo>`` loads it back, verified).
- ``pellucid predict ... --interventions <csv>``: apply a person's corrected findings to a concept model
  (:mod:`pellucid.training.concepts.intervention_file`).
- ``pellucid demo [--config <yaml>] [overrides]``: the whole story on the phantom benchmark (train ProtoPNet, predict
  with explanations, report card, offline W&B run) and where every artefact is (:mod:`pellucid.training.demo`).
- ``pellucid report --ckpt <checkpoint | zoo name> --data <yaml> --out <dir>``: the five-element report card.
- ``pellucid review --ckpt <checkpoint | zoo name> --data <yaml> --port N``: a local review page on 127.0.0.1
  (predictions, prototypes and their sources, concept interventions, prototype corrections;
  :mod:`pellucid.training.review`).

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
import importlib.metadata
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI

from pellucid.models import ModelOptionError, UnknownModelError, list_models
from pellucid.models.pretrained import list_bundles, read_metadata
from pellucid.models.registry import model_builder
from pellucid.training.bundle import export_bundle, initialise_from
from pellucid.training.checkpoint import read_checkpoint
from pellucid.training.checkpoint_facts import (
    CHECKPOINT_SUBCOMMANDS,
    checkpoint_facts,
    give_data_the_checkpoint_classes,
    module_for_checkpoint,
)
from pellucid.training.cli_config import (
    merge_model_options,
    model_option_problem,
)
from pellucid.training.data.base import PellucidDataModule
from pellucid.training.module import InterpretableModule
from pellucid.training.shipped_configs import ConfigNameError, config_main, expand_config_names

LINKED_FROM_DATA = {"spatial_dims": "spatial_dims", "in_channels": "in_channels", "num_classes": "num_classes",
                    "task": "task", "class_names": "class_names", "concept_specs": "concepts"}


def open_wandb_runs(trainer: Any) -> None:
    """Start the run of every ``WandbLogger`` now, as ``pellucid demo`` does: offline within 30 s if online fails.

    A ``WandbLogger`` starts its run on first use with wandb's own timeout (90 s and more without a network, then a
    crash); :func:`~pellucid.training.outputs.wandb_logging.init_run` falls back to an offline run instead.
    """
    from pytorch_lightning.loggers import WandbLogger

    for logger in getattr(trainer, "loggers", []):
        if isinstance(logger, WandbLogger) and logger._experiment is None and trainer.is_global_zero:
            from pellucid.training.outputs.wandb_logging import init_run  # on demand: wandb is heavy

            options = logger._wandb_init
            run = init_run(options.get("dir") or logger.save_dir or ".", project=options.get("project") or "pellucid",
                           name=options.get("name"), mode="offline" if logger._offline else None,
                           init_timeout=15.0)  # plus the offline start: within 30 s
            run.define_metric("trainer/global_step")  # the x-axis WandbLogger sets on the runs it starts itself
            run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
            logger._experiment = run


class PellucidCLI(LightningCLI):
    """LightningCLI wired for pellucid: data facts flow into the model; our optimizer setup is kept."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link the data module's facts into the model's constructor; add ``--init_from``."""
        for source, target in LINKED_FROM_DATA.items():
            parser.link_arguments(f"data.{source}", f"model.{target}", apply_on="instantiate")
        parser.add_argument("--init_from", type=str | None, default=None,
                            help="fine-tune: start from a zoo bundle name, a bundle folder, a .safetensors file or a "
                                 ".ckpt; layers whose shape changed keep their fresh initialisation")
        parser.add_argument("--init_partial", type=bool, default=False,
                            help="with --init_from: allow a partial copy from a source of another spatial_dims or "
                                 "task, or one of which fewer than half of this model's tensors fit")
        parser.add_argument("--corrections", type=str | None, default=None,
                            help="fit: a prototype corrections file (`pellucid review` writes it): fine-tune with the "
                                 "forbid and keep losses; see pellucid.training.prototypes.corrections")
        parser.add_argument("--corrections_shuffle", type=float, default=1.0,
                            help="with --corrections: chance that a training image gets another image's content at "
                                 "the forbidden places, so a shortcut there no longer tells the label (0: never)")
        parser.add_argument("--interventions", type=str | None, default=None,
                            help="predict: a CSV of corrected findings (id, concept, value in the concept's unit) to "
                                 "apply to a concept model; see pellucid.training.concepts.intervention_file")

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

    def before_instantiate_classes(self) -> None:
        """``validate``/``test``/``predict --ckpt_path``: the data reads labels as the checkpoint's classes.

        See :mod:`pellucid.training.checkpoint_facts`; a data argument that disagrees with the checkpoint is a usage
        error.
        """
        self.ckpt_facts = None
        if self.subcommand not in (None, "fit") and self._subcommand_option("corrections"):
            self.parser.error(f"--corrections applies to fit only, not to {self.subcommand}; leave it out")
        if self.subcommand not in (None, "predict") and self._subcommand_option("interventions"):
            self.parser.error(f"--interventions applies to predict only, not to {self.subcommand}; leave it out")
        if self.subcommand in CHECKPOINT_SUBCOMMANDS:
            config = self.config[self.subcommand]
            self.ckpt_facts = checkpoint_facts(getattr(self, "_checkpoint", None))
            problem = self.ckpt_facts and give_data_the_checkpoint_classes(
                config.get("data"), self.ckpt_facts, config.get("ckpt_path"))
            if problem:
                self.parser.error(problem)

    def _parse_ckpt_path(self) -> None:
        """Refuse a ``--ckpt_path`` that needs unpickling code, naming the file, before LightningCLI reads it.

        LightningCLI loads the file (``weights_only=True``) for its hyper-parameters; torch's refusal then suggests
        ``weights_only=False``, which would run the file's code. :func:`read_checkpoint` raises a
        :class:`~pellucid.training.checkpoint.CheckpointError` naming the file and the object instead.
        """
        path = self.config[self.config.subcommand].get("ckpt_path") if self.config.get("subcommand") else None
        checkpoint = read_checkpoint(path) if path and Path(path).is_file() else None
        key = InterpretableModule.CHECKPOINT_HYPER_PARAMS_KEY  # keep its facts only, not the weights
        self._checkpoint = None if checkpoint is None else {key: checkpoint.get(key)}
        super()._parse_ckpt_path()

    def instantiate_classes(self) -> None:
        """Instantiate as LightningCLI does; a model option error from the build is a usage error naming it.

        With a checkpoint (:meth:`before_instantiate_classes`) the model gets the checkpoint's data facts.
        """
        try:
            super().instantiate_classes()
        except ModelOptionError as error:
            self.parser.error(str(error.within(prefix=("model", "model_kwargs"))))
        if getattr(self, "ckpt_facts", None):
            self.model = module_for_checkpoint(self.model, self.ckpt_facts)
        open_wandb_runs(self.trainer)

    def _subcommand_option(self, name: str) -> Any:
        """The value of ``--<name>`` for the running subcommand."""
        return self.config[self.subcommand].get(name) if self.subcommand else self.config.get(name)

    def before_predict(self) -> None:
        """``--interventions <csv>``: check the file against the model now, then apply it to every batch.

        The callback goes first in ``trainer.callbacks``, so its check of the sample ids runs before the writer claims
        its folder.
        """
        path = self._subcommand_option("interventions")
        if path:
            from pellucid.training.concepts.intervention_file import ConceptInterventions

            callback = ConceptInterventions(path)
            callback.check_model(self.model.model)
            self.trainer.callbacks.insert(0, callback)

    def before_fit(self) -> None:
        """Keep ``last.ckpt``, apply ``--init_from`` and say what was copied."""
        if self.trainer.checkpoint_callback is not None:
            self.trainer.checkpoint_callback.save_last = True  # what `--ckpt_path` resumes from after a kill
        source = self._subcommand_option("init_from")
        if source:
            for line in initialise_from(self.model, source, partial=bool(self._subcommand_option("init_partial"))):
                print(line)
        corrections = self._subcommand_option("corrections")
        if corrections:
            from pellucid.training.prototypes.corrections import PrototypeCorrections

            callback = PrototypeCorrections(corrections, shuffle=self._subcommand_option("corrections_shuffle"))
            marked = callback.check_model(self.model.model)  # before any epoch runs
            print(f"corrections {corrections}: {len(marked.marked('forbid'))} forbidden, "
                  f"{len(marked.marked('keep'))} kept prototype(s) of {marked.model} ({marked.checkpoint})")
            self.trainer.callbacks.append(callback)

    def after_fit(self) -> None:
        """Say where the last checkpoint is and how to resume from it."""
        callback = self.trainer.checkpoint_callback
        last = getattr(callback, "last_model_path", "") if callback is not None else ""
        if last and Path(last).is_file() and self.trainer.is_global_zero:
            print(f"last checkpoint: {last}\n  resume or extend this fit: the same command with "
                  f"--ckpt_path {last} (and a larger --trainer.max_epochs to train on)")


def build_cli(args: list[str], run: bool = True) -> PellucidCLI:
    """Construct the CLI (``run=False`` parses and instantiates without running a subcommand)."""
    return PellucidCLI(
        InterpretableModule,
        PellucidDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,  # the module builds per-group optimizers itself
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=expand_config_names(args),
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
    from pellucid.models.pretrained import checkpoints_dir
    from pellucid.training.checkpoint import load_checkpoint

    parser = argparse.ArgumentParser(prog="pellucid export", description="write a checkpoint bundle")
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint of an InterpretableModule")
    parser.add_argument("--name", required=True, help="zoo name of the bundle")
    parser.add_argument("--out", default=None,
                        help="bundle folder (default: <first $PELLUCID_CHECKPOINTS folder or ./checkpoints>/<name>)")
    parser.add_argument("--config", default=None, help="training config to keep with the bundle")
    parser.add_argument("--metrics", default=None, help="JSON file of measured metrics")
    parser.add_argument("--description", default="", help="one paragraph for the model card")
    options = parser.parse_args(args)
    module = load_checkpoint(options.ckpt)  # weights_only: no code from the file runs
    metrics = json.loads(Path(options.metrics).read_text()) if options.metrics else {}
    out = export_bundle(module, options.out or checkpoints_dir() / options.name, options.name,
                        description=options.description, config_path=options.config, metrics=metrics)
    print(f"bundle written: {out}")


def version() -> str:
    """The installed distribution's version."""
    return importlib.metadata.version("pellucid")


def _dispatch(args: list[str]) -> None:
    """Run the subcommand ``args`` names (after replacing ``zoo:<name>`` config names by their files)."""
    args = expand_config_names(args)
    if args[:1] in (["--version"], ["-V"]):
        print(f"pellucid {version()}")
    elif args[:1] == ["config"]:
        config_main(args[1:])
    elif args[:1] == ["zoo"]:
        print_zoo()
    elif args[:1] == ["export"]:
        run_export(args[1:])
    elif args[:1] == ["demo"]:
        from pellucid.training.demo import run_demo  # on demand, as the report it runs

        run_demo(args[1:])
    elif args[:1] == ["push"]:
        from pellucid.training.bundle_push import push_main  # on demand: huggingface_hub is optional

        push_main(args[1:])
    elif args[:1] == ["report"]:
        from pellucid.training.outputs.report import report_main  # on demand: the report pulls in matplotlib and W&B

        report_main(args[1:])
    elif args[:1] == ["review"]:
        from pellucid.training.review.server import review_main  # on demand: the page's server and figures

        review_main(args[1:])
    else:
        build_cli(args)


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe a problem with the user's input, files or options: one line, no traceback."""
    from pellucid.models.pretrained import BundleError
    from pellucid.models.prototype_corrections import CorrectionsError
    from pellucid.training.bundle import InitialisationError
    from pellucid.training.checkpoint import CheckpointError
    from pellucid.training.concepts.intervention_file import InterventionFileError
    from pellucid.training.data.manifest_rows import ManifestError
    from pellucid.training.outputs.dicom import DicomOutputError
    from pellucid.training.outputs.writer_folder import OutputFolderError

    return (ManifestError, ModelOptionError, UnknownModelError, BundleError, CheckpointError, InitialisationError,
            OutputFolderError, ConfigNameError, InterventionFileError, DicomOutputError, CorrectionsError)


class _DropMessages(logging.Filter):
    """Drop log records whose message contains one of ``fragments``."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(fragment in record.getMessage() for fragment in self.fragments)


def silence_third_party_noise() -> None:
    """Hide the specific third-party messages every command printed and no user can act on (the command only)."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended to run from within Python")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
        _DropMessages("try installing [litlogger]", "try installing [litmodels]"))
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").addFilter(_DropMessages("nvImageCodec is not available"))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``pellucid`` console script.

    A known user error (a bad manifest, model option, bundle, checkpoint or ``--init_from``) prints one line,
    ``pellucid: error: ...``, and exits with status 1; ``--debug`` or ``PELLUCID_DEBUG=1`` shows its traceback.
    """
    os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    os.environ.setdefault("WANDB_MODE", "offline")
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("PELLUCID_DEBUG", "").lower() in ("1", "true", "yes")
    args = [arg for arg in args if arg != "--debug"]
    silence_third_party_noise()
    try:
        _dispatch(args)
    except user_errors() as error:
        if debug:
            raise
        print(f"pellucid: error: {' '.join(str(error).split())}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
