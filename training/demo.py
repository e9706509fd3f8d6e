"""``pellucid demo``: the whole story on the 2D phantom benchmark in one command (what ``make demo`` runs).

1. **Train** ProtoPNet (:data:`DEMO_CONFIG`, the shipped experiment) with an offline Weights & Biases run that follows
   training: losses and task metrics (``WandbLogger``), and every few validation epochs the explanation overlays and
   prototypes of a few validation samples with the five-element metrics
   (:class:`~pellucid.training.outputs.wandb_logging.WandbExplanationLogger`,
   :class:`~pellucid.training.elements.callback.FiveElementMetrics`).
2. **Predict with explanations**: one ``<id>.npz`` per sample of the predict split and an ``index.csv``
   (:class:`~pellucid.training.outputs.writer.ExplanationWriter`).
3. **Report card** on the test split: ``report.html`` (figures embedded) and ``report.json``
   (:func:`~pellucid.training.outputs.report.write_report`), also logged into the W&B run.
4. **Print** the headline test metrics and where every artefact is.

``pellucid demo [--config <yaml>] [--out <dir>] [--wandb_dir <dir>] [--baseline <ckpt | zoo name>] [overrides]``:
any other argument goes to the training config exactly as for ``pellucid fit`` (e.g. ``--trainer.max_epochs=2``).
The W&B run lives under ``<wandb_dir>/wandb`` (default ``./wandb``), offline unless ``WANDB_MODE=online``; upload it
later with ``wandb sync``. The black-box baseline is not trained by the demo (it would double the time); pass
``--baseline`` with a black-box checkpoint to see it side by side with Grad-CAM in the report.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from pellucid.training.cli import build_cli
from pellucid.training.elements.callback import ELEMENTS, FiveElementMetrics
from pellucid.training.outputs.report import explain_and_report
from pellucid.training.outputs.wandb_logging import WandbExplanationLogger, init_run
from pellucid.training.shipped_configs import resolve_config

DEMO_CONFIG = "zoo:protopnet_phantom2d"  # configs/experiments/protopnet_phantom2d.yaml, checkout or installed
HEADLINE_FIVE = ("pointing_game", "energy_inside_mask", "prototype_purity", "concept_accuracy",
                 "logit_reconstruction_exact", "deletion_faithfulness", "randomization_flagged", "intervention_gain",
                 "shortcut_flagged")
ARTEFACT_LABELS = {"checkpoint": "checkpoint", "explanations": "predictions (.npz)", "index": "prediction index",
                   "report_html": "report (HTML)", "report_json": "report (JSON)", "wandb_run": "W&B offline run",
                   "logs": "training logs"}


@dataclass
class DemoResult:
    """What the demo made: artefact name -> path (see :data:`ARTEFACT_LABELS`), and the report card's numbers."""

    artefacts: dict[str, Path]
    task_metrics: dict[str, float | None]
    five_elements: dict[str, dict[str, float | None]] = field(default_factory=dict)


def demo_parser() -> argparse.ArgumentParser:
    """The demo's own options; everything else is left for the training config (LightningCLI)."""
    parser = argparse.ArgumentParser(
        prog="pellucid demo", allow_abbrev=False,
        description="Train ProtoPNet on the 2D phantom benchmark, write every prediction's explanation, the report "
                    "card and an offline W&B run, and print where they are.",
        epilog="Any other argument goes to the training config, as for `pellucid fit` (--config <yaml>, "
               f"--trainer.max_epochs=2, --data.init_args.num_train=500 ...). Default config: {DEMO_CONFIG}.")
    parser.add_argument("--out", default=None,
                        help="folder for explanations/ and report/ (default: the run's log folder)")
    parser.add_argument("--wandb_dir", default=".", help="folder that receives wandb/ (default: the current folder)")
    parser.add_argument("--baseline", default=None,
                        help="black-box checkpoint or zoo name shown side by side in the report (default: none)")
    return parser


def _with_config(args: list[str]) -> list[str]:
    """``args`` with ``--config`` :data:`DEMO_CONFIG` in front unless they name a config."""
    if any(arg == "--config" or arg.startswith("--config=") for arg in args):
        return args
    return ["--config", str(resolve_config(DEMO_CONFIG)), *args]


def _attach_wandb(trainer: pl.Trainer, save_dir: str | Path, name: str) -> tuple[Any, bool]:
    """The W&B run that follows training: the config's ``WandbLogger`` run, else a new offline one (and ``True``)."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return logger.experiment, False
    run = init_run(save_dir, project="pellucid", name=name)
    # save_dir: where checkpoints go should the config have no other logger
    trainer.loggers = [*trainer.loggers, WandbLogger(experiment=run, save_dir=trainer.default_root_dir)]
    return run, True


def _add_explanation_callbacks(trainer: pl.Trainer) -> None:
    """Five-element metrics and W&B explanations about four times during training, unless the config has them."""
    every = max(1, (trainer.max_epochs or 1) // 4)
    extra: list[pl.Callback] = []
    if not any(isinstance(c, FiveElementMetrics) for c in trainer.callbacks):
        extra.append(FiveElementMetrics(every_n_epochs=every, stages=("val",), deletion_samples=16))
    if not any(isinstance(c, WandbExplanationLogger) for c in trainer.callbacks):
        extra.append(WandbExplanationLogger(every_n_epochs=every, num_samples=4, log_test=False))
    # before the checkpoint callbacks, which Lightning keeps last
    position = next((i for i, c in enumerate(trainer.callbacks) if isinstance(c, Checkpoint)), len(trainer.callbacks))
    trainer.callbacks[position:position] = extra


def _run_folder(trainer: pl.Trainer) -> Path:
    """The run's log folder (``.../lightning_logs/version_N``), else ``default_root_dir``."""
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger | TensorBoardLogger):
            return Path(logger.log_dir)
    return Path(trainer.default_root_dir)


def _trained_checkpoint(trainer: pl.Trainer, folder: Path) -> Path:
    """The checkpoint to explain: the best one (the last one for configs without a monitor), else one saved now."""
    callback = trainer.checkpoint_callback
    chosen = getattr(callback, "best_model_path", "") or getattr(callback, "last_model_path", "")
    if chosen:
        return Path(chosen)
    path = folder / "checkpoints" / "demo.ckpt"
    trainer.save_checkpoint(path)
    return path


def run_demo(args: Sequence[str]) -> DemoResult:
    """Train, explain, report, log, and print where everything is (see the module docstring).

    Args:
        args: Command-line arguments after ``demo``.

    Returns:
        The artefacts' paths and the report card's headline numbers.
    """
    options, lightning_args = demo_parser().parse_known_args(list(args))
    cli = build_cli(_with_config(lightning_args), run=False)
    trainer, module, datamodule = cli.trainer, cli.model, cli.datamodule
    _add_explanation_callbacks(trainer)
    run, own_run = _attach_wandb(trainer, options.wandb_dir, name=f"demo-{module.model.name}")
    try:
        trainer.fit(module, datamodule=datamodule)
        folder = _run_folder(trainer)
        checkpoint = _trained_checkpoint(trainer, folder)
        produced = explain_and_report(checkpoint, datamodule, Path(options.out) if options.out else folder,
                                      options.baseline, wandb_run=run)
    finally:
        if own_run:
            run.finish()
    result = _summarise({"checkpoint": checkpoint, **produced, "logs": folder})
    print_summary(result, module.model.name)
    return result


def _summarise(artefacts: dict[str, Path]) -> DemoResult:
    report = json.loads(artefacts["report_json"].read_text(encoding="utf-8"))
    five: dict[str, dict[str, float | None]] = {}
    for element in ELEMENTS:
        values = {m["name"]: m.get("model") for m in report["elements"][element]["metrics"]}
        five[element] = {name: values[name] for name in HEADLINE_FIVE if values.get(name) is not None}
    return DemoResult(artefacts=artefacts, task_metrics=dict(report["models"]["model"]["task_metrics"]),
                      five_elements=five)


def print_summary(result: DemoResult, model_name: str) -> None:
    """Print the headline test metrics and where every artefact is."""
    npz_files = len(list(result.artefacts["explanations"].glob("*.npz")))
    print(f"\npellucid demo finished: {model_name} on the phantom benchmark")
    print("  test metrics (report card, test split)")
    for name, value in result.task_metrics.items():
        print(f"    {name:<34} {'n/a' if value is None else f'{value:.4f}'}")
    print("  five-element metrics (report card)")
    for element, values in result.five_elements.items():
        for name, value in values.items():
            print(f"    {element + ' / ' + name:<60} {value:.4f}")
    print("  artefacts")
    for key, label in ARTEFACT_LABELS.items():
        note = {"explanations": f"  ({npz_files} .npz files, one per predicted sample)",
                "wandb_run": "  (upload later: wandb sync <this folder>)"}.get(key, "")
        print(f"    {label:<20} {result.artefacts[key]}{note}")
