"""The public evaluation API: what the scripts in ``benchmarks/`` (and a user's own study) call.

Fit a LightningCLI config exactly as ``pellucid fit`` does and test it (:func:`fit_config`, :func:`test_metrics`);
measure the five elements of a checkpoint with the report card's code (:func:`evaluate_model`, the code behind
``pellucid report``); describe the machine (:func:`machine`); summarise seeds (:func:`seed_summary`); give a
compared baseline the same budget (:func:`same_budget_overrides`); build a module, a phantom batch and a timed
training step for speed and memory measurements. Measurements beyond the report card (upsampling ceiling, latent
separation, concept evaluation, push cost, peak memory) are in :mod:`pellucid.training.evaluate_measures`.

    from pellucid.training.evaluate import fit_config, test_metrics, evaluate_model
    fit = fit_config("configs/experiments/cbm_phantom2d.yaml", ["--trainer.max_epochs=1"], seed=0, root=out)
    print(test_metrics(fit), evaluate_model(fit, fit.datamodule, out / "report").metrics)
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import yaml
from torch.utils.data import default_collate

from pellucid.models.pretrained import read_metadata, resolve_bundle
from pellucid.training import InterpretableModule
from pellucid.training.checkpoint import load_checkpoint, read_checkpoint
from pellucid.training.cli import build_cli
from pellucid.training.cli import main as run_pellucid  # the `pellucid` command in-process (fit --init_from ...)
from pellucid.training.data import PHANTOM_CONCEPTS, PhantomConfig, PhantomDataset, PhantomGenerator
from pellucid.training.elements.actionability import marker_enrichment
from pellucid.training.elements.callback import FiveElementMetrics
from pellucid.training.elements.counterfactual import top_blocks, twin_source
from pellucid.training.elements.evaluator import ExplanationEvaluator
from pellucid.training.elements.families import concept_specs
from pellucid.training.elements.localization import evidence_maps
from pellucid.training.elements.posthoc import LogitsOnly, posthoc_maps
from pellucid.training.elements.quantus_bridge import lesion_images, own_explanation, quantus_model
from pellucid.training.outputs.report import ReportPaths, load_datamodule, load_module, write_report
from pellucid.training.shipped_configs import resolve_config


# ------------------------------------------------------------------------------------------------ the machine
def machine() -> dict[str, Any]:
    """Where numbers were measured: platform, processor, CPUs, Python, torch and its threads, load average now."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}


# -------------------------------------------------------------------------------------------- fit and test
@dataclass
class FitResult:
    """A config fitted through the CLI's code path: the module, trainer, data module and what was measured.

    ``checkpoint`` holds the selected weights (see :func:`fit_config`); ``test`` is filled by :func:`test_metrics`.
    """

    module: InterpretableModule
    trainer: pl.Trainer
    datamodule: pl.LightningDataModule
    checkpoint: Path | None
    fit_seconds: float | None
    test: dict[str, float] = field(default_factory=dict)
    test_seconds: float | None = None

    @property
    def epochs(self) -> int:
        """Epochs the trainer ran."""
        return self.trainer.current_epoch

    def selected_module(self) -> InterpretableModule:
        """The module on the CPU holding the selected checkpoint's weights (and prototype provenance)."""
        module = self.module.cpu()
        if self.checkpoint is not None:
            module.load_state_dict(read_checkpoint(self.checkpoint)["state_dict"])
        return module


def fit_config(config: str | Path, overrides: Sequence[str] = (), seed: int | None = None, *,
               root: str | Path | None = None, select: str = "best", checkpoint: str | Path | None = None,
               test: bool = False, test_callbacks: Sequence[pl.Callback] = ()) -> FitResult:
    """Fit a LightningCLI config with :func:`pellucid.training.cli.build_cli`, as ``pellucid fit`` does.

    Args:
        config: Experiment config (YAML).
        overrides: CLI arguments after the config (later ones win).
        seed: ``--seed_everything`` (the data keep their own seed); ``None`` keeps the config's.
        root: ``trainer.default_root_dir`` (logs and checkpoints); ``None`` keeps the config's.
        select: Which weights ``FitResult.checkpoint`` holds: ``"best"``, the config's ``ModelCheckpoint`` choice
            (its monitor's best, or the last one saved; the final weights in ``<root>/final.ckpt`` without one), or
            ``"last"``, the final weights saved to ``<root>/last-weights.ckpt``.
        checkpoint: Test this checkpoint of ``config`` instead of fitting (``fit_seconds`` is ``None``).
        test: Also run :func:`test_metrics`.
        test_callbacks: Callbacks added for the test (see :func:`test_metrics`).

    Raises:
        ValueError: for an unknown ``select``.
    """
    if select not in ("best", "last"):
        raise ValueError(f"fit_config: select must be 'best' or 'last', got {select!r}")
    args = ["--config", str(config), *([f"--trainer.default_root_dir={root}"] if root is not None else []),
            "--trainer.enable_progress_bar=false", *overrides, *([f"--seed_everything={seed}"] if seed is not None
                                                                  else [])]
    cli = build_cli(args, run=False)
    result = FitResult(cli.model, cli.trainer, cli.datamodule, Path(checkpoint) if checkpoint else None, None)
    if checkpoint is None:
        start = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        result.fit_seconds = time.perf_counter() - start
        result.checkpoint = _selected_checkpoint(cli.trainer, Path(cli.trainer.default_root_dir), select)
    if test:
        test_metrics(result, callbacks=test_callbacks)
    return result


def _selected_checkpoint(trainer: pl.Trainer, root: Path, select: str) -> Path:
    callback = trainer.checkpoint_callback
    if select == "best" and callback is not None and callback.best_model_path:
        return Path(callback.best_model_path)
    path = root / ("final.ckpt" if select == "best" else "last-weights.ckpt")
    trainer.save_checkpoint(path)
    return path


def test_metrics(fit: FitResult, *, callbacks: Sequence[pl.Callback] = (), from_checkpoint: bool = True
                 ) -> dict[str, float]:
    """Test ``fit`` on its data module's test split; return (and keep in ``fit.test``) every ``test/`` metric.

    Args:
        fit: What :func:`fit_config` returned.
        callbacks: Added to the trainer before testing (their logged values are returned too).
        from_checkpoint: Test ``fit.checkpoint`` (loaded into the module); ``False`` tests the module as it is.
    """
    fit.trainer.callbacks.extend(callbacks)
    start = time.perf_counter()
    path = str(fit.checkpoint) if from_checkpoint and fit.checkpoint is not None else None
    tested = fit.trainer.test(fit.module, datamodule=fit.datamodule, ckpt_path=path, verbose=False)[0]
    logged = {k: v for k, v in fit.trainer.callback_metrics.items() if k.startswith("test/")}
    fit.test_seconds = time.perf_counter() - start
    fit.test = {key: float(value) for key, value in {**tested, **logged}.items()}
    return fit.test


# ------------------------------------------------------------------------------------- the five elements
@dataclass
class Evaluation:
    """The five-element report card of a model (and baseline): the report, where it was written, flat metrics."""

    report: dict[str, Any]
    paths: ReportPaths
    metrics: dict[str, float]
    seconds: float


def evaluate_model(model_or_checkpoint: str | Path | FitResult, datamodule: Any, out: str | Path,
                   baseline: str | Path | FitResult | None = None, **options: Any) -> Evaluation:
    """Measure the five elements on ``datamodule``'s test split with the report card's code (``pellucid report``).

    Args:
        model_or_checkpoint: A ``.ckpt`` file, a zoo name or bundle folder, or a :class:`FitResult` (its checkpoint).
        datamodule: A data module, or a data / experiment config.
        out: Folder for ``report.json``, ``report.html`` and figures.
        baseline: Optional baseline, reported side by side.
        **options: :func:`pellucid.training.outputs.report.write_report` options (``sanity_samples``,
            ``deletion_samples``, ``split``, ``limit_batches`` ...).

    Returns:
        The report, its paths, and the model's metrics flattened by :func:`flatten_report`.
    """
    def source(item: str | Path | FitResult) -> str | Path:
        return item.checkpoint if isinstance(item, FitResult) else item

    start = time.perf_counter()
    paths = write_report(source(model_or_checkpoint), datamodule, out,
                         None if baseline is None else source(baseline), **options)
    report = json.loads(paths.json.read_text(encoding="utf-8"))
    return Evaluation(report, paths, flatten_report(report), time.perf_counter() - start)


def flatten_report(report: dict[str, Any], role: str = "model") -> dict[str, float]:
    """``{"test/accuracy": ..., "localization/pointing_game": ...}`` from a report JSON (numbers only)."""
    model = report["models"][role]
    metrics = {f"test/{name}": float(value) for name, value in model["task_metrics"].items()
               if isinstance(value, int | float)}
    for element, section in report["elements"].items():
        for row in section["metrics"]:
            value = row.get(role)
            if isinstance(value, int | float) and not isinstance(value, bool):
                metrics[f"{element}/{row['name']}"] = float(value)
    return metrics


# ---------------------------------------------------------------------------------- seeds and budgets
def seed_summary(values: Sequence[float], digits: int = 4) -> dict[str, float]:
    """Mean, population standard deviation, minimum and maximum of one number over seeds (mean and sd rounded)."""
    if not values:
        raise ValueError("seed_summary: expected at least one value, got none")
    return {"mean": round(statistics.fmean(values), digits), "sd": round(statistics.pstdev(values), digits),
            "min": min(values), "max": max(values)}


def config_settings(config: str | Path, section: str = "model", keys: Sequence[str] | None = None
                    ) -> dict[str, Any]:
    """One section of a config file (``model`` by default), only ``keys`` if given; empty if absent."""
    settings = (yaml.safe_load(Path(config).read_text()) or {}).get(section) or {}
    return {key: settings[key] for key in (keys or settings) if settings.get(key) is not None}


def same_budget_overrides(config: str | Path) -> list[str]:
    """CLI overrides that give another phantom config (a baseline) the epochs and augmentation of ``config``.

    Raises:
        ValueError: naming the file when it sets no integer ``trainer.max_epochs``.
    """
    epochs = config_settings(config, "trainer").get("max_epochs")
    if not isinstance(epochs, int) or isinstance(epochs, bool):
        raise ValueError(f"{config}: expected an integer trainer.max_epochs to match the baseline's budget to, "
                         f"got {epochs!r}")
    augment = bool((config_settings(config, "data").get("init_args") or {}).get("augment", False))
    return [f"--trainer.max_epochs={epochs}", f"--data.init_args.augment={str(augment).lower()}"]


def same_backbone_overrides(config: str | Path) -> list[str]:
    """CLI overrides that give another config the backbone (``model_kwargs.backbone`` and its kwargs) of ``config``.

    ``backbone_kwargs`` is reset (``null``) and then given whole: the CLI merges mappings key by key, so without the
    reset a key the baseline's own config sets and ``config`` does not would survive; the baseline gets exactly the
    evaluated backbone.

    Raises:
        ValueError: naming the file when ``model.model_kwargs.backbone_kwargs`` is not a mapping.
    """
    model_kwargs = config_settings(config).get("model_kwargs") or {}
    backbone_kwargs = model_kwargs.get("backbone_kwargs") or {}
    if not isinstance(backbone_kwargs, dict):
        raise ValueError(f"{config}: expected model.model_kwargs.backbone_kwargs to be a mapping, "
                         f"got {backbone_kwargs!r}")
    overrides = [f"--model.model_kwargs.backbone={model_kwargs['backbone']}"] if "backbone" in model_kwargs else []
    if backbone_kwargs:
        overrides += ["--model.model_kwargs.backbone_kwargs=null",
                      f"--model.model_kwargs.backbone_kwargs={json.dumps(backbone_kwargs)}"]
    return overrides


# ------------------------------------------------------------------------- modules, batches, steps
def phantom_module(model: str = "blackbox", spatial_dims: int = 2, *, segmentation: bool = False,
                   seed: int | None = None, **settings: Any) -> InterpretableModule:
    """The model inside the training module as the CLI builds it for the phantom data (1 channel, its concepts).

    Args:
        model: Registry name.
        spatial_dims: 2 or 3.
        segmentation: Two-class segmentation instead of the 3-class image label.
        seed: ``torch.manual_seed`` before building (``None``: leave the generator as it is).
        **settings: Further ``InterpretableModule`` arguments (``model_kwargs``, ``loss_weights`` ...).
    """
    if seed is not None:
        torch.manual_seed(seed)
    return InterpretableModule(model, spatial_dims=spatial_dims, in_channels=1, num_classes=2 if segmentation else 3,
                               task="segmentation" if segmentation else "multiclass",
                               concepts=list(PHANTOM_CONCEPTS), **settings)


def phantom_batch(spatial_dims: int = 2, batch_size: int = 32, image_size: int | None = None,
                  device: str | torch.device | None = None) -> dict[str, Any]:
    """The first ``batch_size`` phantoms of the training split (seed 0), collated (image, label, mask, concepts ...)."""
    config = PhantomConfig(spatial_dims=spatial_dims, **({"image_size": image_size} if image_size else {}))
    data = PhantomDataset(PhantomGenerator(config, seed=0), "train", batch_size)
    batch = default_collate([data[i] for i in range(batch_size)])
    if device is not None:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


def training_step(module: InterpretableModule, batch: dict[str, Any], *, bf16_autocast: bool = False
                  ) -> Callable[[bool], float]:
    """A function that runs one training step on ``batch`` with ``explain`` on or off and returns its seconds.

    The step is what ``InterpretableModule.training_step`` computes (forward, the model's weighted loss terms)
    plus backward and the module's optimizer step; every call shares one optimizer (its learning-rate schedule is
    not stepped).
    """
    module.train()
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    device_type = batch["image"].device.type

    def step(explain: bool = False) -> float:
        begin = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16_autocast):
            total, _ = module.compute_loss(module.model(batch["image"], explain=explain), batch)
        total.backward()
        optimizer.step()
        return time.perf_counter() - begin

    return step


__all__ = ["Evaluation", "ExplanationEvaluator", "FitResult", "FiveElementMetrics", "LogitsOnly", "concept_specs",
           "config_settings", "evaluate_model", "evidence_maps", "fit_config", "flatten_report", "lesion_images",
           "load_checkpoint", "load_datamodule", "load_module", "machine", "marker_enrichment", "own_explanation",
           "phantom_batch", "phantom_module", "posthoc_maps", "quantus_model", "read_metadata", "resolve_bundle",
           "resolve_config", "run_pellucid", "same_backbone_overrides", "same_budget_overrides", "seed_summary",
           "test_metrics", "top_blocks", "training_step", "twin_source"]
