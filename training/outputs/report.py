"""``pellucid report``: the five-element report card of a checkpoint on a dataset, as self-contained HTML and JSON.

``pellucid report --ckpt <checkpoint.ckpt | zoo name | bundle folder> --data <data or experiment yaml> --out <dir>
[--baseline <checkpoint.ckpt>] [--split test] [--limit-batches N] [--data-arg key=value ...]`` writes

- ``<out>/report.json``: per element, each metric's name, definition, direction and value (and the baseline's);
  task metrics; the sanity check; curves; notes on what could not be measured and why;
- ``<out>/report.html``: the same as a page with every figure embedded (base64 PNG), model and baseline side by side;
- ``<out>/figures/*.png``: the figures, also listed in the JSON.

The evaluation is the one training uses: ``Trainer.test`` (or ``validate``) with the
:class:`~pellucid.training.elements.callback.FiveElementMetrics` callback, plus the parameter-randomisation sanity check
(:mod:`pellucid.training.elements.sanity`) on 32 example images and the built-in against post-hoc comparison
(Grad-CAM, occlusion, integrated gradients: :mod:`pellucid.training.outputs.report_posthoc`) on 8 images with a lesion.
Every model goes through ``ModelOutput`` alone.
For the demo story, :func:`explain_and_report` runs predict-with-explanations, the report and an offline W&B run.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import yaml

from pellucid.models.pretrained import load_pretrained
from pellucid.training.checkpoint import load_checkpoint
from pellucid.training.data.base import PellucidDataModule
from pellucid.training.elements.results import ELEMENT_TITLES, ELEMENTS, SANITY_METRICS, MetricResult
from pellucid.training.elements.sanity import SanityResult, describe
from pellucid.training.module import InterpretableModule
from pellucid.training.outputs.report_evaluation import ModelEvaluation, element_figures, evaluate_checkpoint
from pellucid.training.outputs.report_template import render_html
from pellucid.training.outputs.wandb_logging import WandbMode, init_run
from pellucid.training.outputs.writer import ExplanationWriter
from pellucid.training.outputs.writer_index import INDEX_FILE

REPORT_FORMAT = "pellucid-report/1"


# ------------------------------------------------------------------------------------------------- loading
def load_module(ckpt: str | Path) -> InterpretableModule:
    """The module to report on, on the CPU: from a Lightning checkpoint file, a zoo name or a bundle folder.

    A ``.ckpt`` file is read with ``torch.load(weights_only=True)`` and the model rebuilt from its stored name and
    arguments (:func:`pellucid.training.checkpoint.load_checkpoint`: no code from the file ever runs); a bundle
    (``pellucid zoo`` lists them) is loaded with :func:`pellucid.models.pretrained.load_pretrained` (sha256-checked
    safetensors) and wrapped with the task, classes and concepts its metadata records.

    Raises:
        FileNotFoundError: for a checkpoint path that does not exist.
        CheckpointError: naming the file when it needs unpickling code or is not an InterpretableModule checkpoint.
        BundleError: for an unknown zoo name or a broken bundle (naming the bundles that exist).
    """
    path = Path(ckpt)
    if path.is_file():
        return load_checkpoint(path)
    if path.suffix == ".ckpt":
        raise FileNotFoundError(f"--ckpt: checkpoint file {str(ckpt)!r} not found")
    model, metadata = load_pretrained(ckpt)
    return InterpretableModule(model, task=metadata.get("task") or "multiclass", class_names=metadata.get("classes"),
                               concepts=metadata.get("concepts"))


def _datamodule(data: str | Path | PellucidDataModule,
                overrides: Mapping[str, Any] | None) -> PellucidDataModule:
    """``data`` itself when it is a data module (then ``overrides`` must be empty), else the config's module."""
    if isinstance(data, PellucidDataModule):
        if overrides:
            raise ValueError(f"data_overrides {dict(overrides)} cannot change a data module that is already built "
                             f"({type(data).__name__}); pass its config path instead, or build it with those settings")
        return data
    return load_datamodule(data, overrides)


def load_datamodule(config: str | Path, overrides: Mapping[str, Any] | None = None) -> PellucidDataModule:
    """The data module of a data (or experiment) config: its ``data: {class_path, init_args}`` section.

    Args:
        config: YAML file with a ``data`` section (a ``configs/data/*.yaml`` fragment or a complete experiment).
        overrides: ``init_args`` to replace (e.g. ``{"num_test": 64}``).

    Raises:
        ValueError: naming the file and what is missing.
    """
    with open(config, encoding="utf-8") as handle:
        content = yaml.safe_load(handle) or {}
    section = content.get("data", content) if isinstance(content, Mapping) else None
    if not isinstance(section, Mapping) or "class_path" not in section:
        raise ValueError(f"--data {config}: expected a 'data:' section with 'class_path' and 'init_args'")
    module_name, _, class_name = str(section["class_path"]).rpartition(".")
    data_class = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(data_class, type) and issubclass(data_class, PellucidDataModule)):
        raise ValueError(f"--data {config}: class_path {section['class_path']!r} is not a PellucidDataModule")
    return data_class(**{**dict(section.get("init_args") or {}), **dict(overrides or {})})


# -------------------------------------------------------------------------------------------------- report
def _value(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _json_safe(value: Any) -> Any:
    """NaN and infinities (e.g. an AUROC over one class) become ``None``: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


def _sanity_results(sanity: SanityResult | None) -> list[MetricResult]:
    """The parameter-randomisation check as rows of its registered metrics (``None`` values when not run)."""
    values = {} if sanity is None else {"randomization_spearman": sanity.final_spearman,
                                        "randomization_ssim": sanity.final_ssim,
                                        "randomization_flagged": float(sanity.flagged)}
    return [MetricResult.of(name, values.get(name)) for name in SANITY_METRICS]


def _metric_row(result: MetricResult) -> dict[str, Any]:
    """A report row's description, read from the registered metric the value was computed under."""
    metric = result.metric
    return {"name": metric.name, "definition": metric.definition, "higher_is_better": metric.higher_is_better,
            "unit": metric.unit}


def build_report(evaluations: Mapping[str, ModelEvaluation], data_info: Mapping[str, Any],
                 figure_files: Mapping[str, Mapping[str, list[tuple[str, str]]]]) -> dict[str, Any]:
    """The report as a JSON-serialisable dict (see the module docstring); ``evaluations`` keyed model/baseline."""
    elements: dict[str, Any] = {}
    for element in ELEMENTS:
        rows: dict[str, dict[str, Any]] = {}
        for role, evaluation in evaluations.items():
            results = [m for m in [*evaluation.results.metrics, *_sanity_results(evaluation.sanity)]
                       if m.element == element]
            for result in results:
                row = rows.setdefault(result.name, _metric_row(result))
                if row["definition"] != result.definition:
                    raise ValueError(f"report: metric {result.name!r} has two definitions ({row['definition']!r} and "
                                     f"{result.definition!r}); every metric is registered once")
                row[role] = _value(result.value)
        elements[element] = {
            "title": ELEMENT_TITLES[element],
            "metrics": list(rows.values()),
            "notes": {role: e.results.notes.get(element, []) for role, e in evaluations.items()},
            "figures": {role: [{"caption": c, "file": f} for c, f in figure_files[role].get(element, [])]
                        for role in evaluations},
        }
    return {
        "format": REPORT_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "data": dict(data_info),
        "models": {role: {"name": e.name, "checkpoint": e.checkpoint, "task_metrics": e.task_metrics,
                          "samples": e.results.samples,
                          "sanity": None if e.sanity is None else {**e.sanity.to_dict(), "summary": describe(e.sanity)},
                          "curves": [vars(c) for c in e.results.curves]}
                   for role, e in evaluations.items()},
        "elements": elements,
    }


@dataclass
class ReportPaths:
    """Where a report was written."""

    html: Path
    json: Path
    figures: list[Path]


def write_report(ckpt: str | Path, data: str | Path | PellucidDataModule, out: str | Path,
                 baseline: str | Path | None = None, *, split: str = "test", limit_batches: int | float | None = None,
                 data_overrides: Mapping[str, Any] | None = None, sanity_samples: int = 32,
                 deletion_samples: int = 64, examples: int = 3, accelerator: str = "cpu",
                 posthoc_samples: int = 8) -> ReportPaths:
    """Evaluate ``ckpt`` (and ``baseline``) on ``data`` and write ``report.html``, ``report.json`` and figures.

    Args:
        ckpt: Checkpoint file or zoo name.
        data: Data config YAML, or a data module.
        out: Output folder (created).
        baseline: Optional baseline checkpoint (e.g. the black-box with Grad-CAM), shown side by side.
        split: ``"test"`` or ``"val"``.
        limit_batches: Evaluate only this many batches (or fraction).
        data_overrides: ``init_args`` replaced in the data config (refused with a data module: ValueError).
        sanity_samples: Images in the randomisation check (0 skips it).
        deletion_samples: Samples with deletion curves.
        examples: Example figures per element.
        accelerator: Lightning accelerator.
        posthoc_samples: Images with a lesion on which the model's own map is compared with Grad-CAM, occlusion and
            integrated gradients of the same model (0 skips the comparison).
    """
    datamodule = _datamodule(data, data_overrides)  # first: bad input stops before anything is written
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    sources = {"model": ckpt} | ({"baseline": baseline} if baseline is not None else {})
    evaluations, figure_files, written = {}, {}, []
    for role, source in sources.items():
        module = load_module(source)
        evaluations[role] = evaluate_checkpoint(module, datamodule, name=f"{role}: {module.model.name}",
                                                checkpoint=str(source), split=split, limit_batches=limit_batches,
                                                sanity_samples=sanity_samples, deletion_samples=deletion_samples,
                                                accelerator=accelerator, posthoc_samples=posthoc_samples)
        figure_files[role] = {}
        for element, items in element_figures(evaluations[role], examples).items():
            for number, (caption, png) in enumerate(items):
                path = out / "figures" / f"{role}_{element}_{number}.png"
                path.write_bytes(png)
                written.append(path)
                figure_files[role].setdefault(element, []).append((caption, str(path.relative_to(out))))
    data_info = {"config": str(data) if not isinstance(data, PellucidDataModule) else None,
                 "class": f"{type(datamodule).__module__}.{type(datamodule).__name__}", "split": split,
                 "overrides": dict(data_overrides or {}), "class_names": getattr(datamodule, "class_names", None)}
    report = _json_safe(build_report(evaluations, data_info, figure_files))
    json_path, html_path = out / "report.json", out / "report.html"
    json_path.write_text(json.dumps(report, indent=2, allow_nan=False), encoding="utf-8")
    html_path.write_text(render_html(report, out), encoding="utf-8")
    return ReportPaths(html=html_path, json=json_path, figures=written)


# ------------------------------------------------------------------------------------------------ commands
def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    parsed = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise ValueError(f"--data-arg expects key=value, got {pair!r}")
        parsed[key] = yaml.safe_load(value)
    return parsed


def report_main(argv: Sequence[str]) -> ReportPaths:
    """``pellucid report`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="pellucid report", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint file (.ckpt) or zoo name")
    parser.add_argument("--data", required=True, help="data (or experiment) config YAML with a data: section")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--baseline", help="baseline checkpoint shown side by side (e.g. blackbox + Grad-CAM)")
    parser.add_argument("--split", default="test", choices=["test", "val"])
    parser.add_argument("--limit-batches", type=float, help="evaluate only this many batches (or a fraction < 1)")
    parser.add_argument("--data-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="override one init_args entry of the data config (repeatable)")
    parser.add_argument("--sanity-samples", type=int, default=32, help="images in the randomisation check (0: skip)")
    parser.add_argument("--posthoc-samples", type=int, default=8,
                        help="lesion images on which Grad-CAM, occlusion and integrated gradients are compared with "
                             "the model's own map (0: skip)")
    parser.add_argument("--deletion-samples", type=int, default=64, help="samples with deletion curves")
    parser.add_argument("--examples", type=int, default=3, help="example figures per element")
    parser.add_argument("--accelerator", default="cpu")
    args = parser.parse_args(list(argv))
    limit = args.limit_batches
    limit = int(limit) if limit is not None and limit >= 1 else limit
    paths = write_report(args.ckpt, args.data, args.out, args.baseline, split=args.split, limit_batches=limit,
                         data_overrides=_overrides(args.data_arg), sanity_samples=args.sanity_samples,
                         deletion_samples=args.deletion_samples, examples=args.examples,
                         accelerator=args.accelerator, posthoc_samples=args.posthoc_samples)
    print(f"report: {paths.html}\njson:   {paths.json}")
    return paths


# ------------------------------------------------------------------------------------------- demo story
def log_report_to_wandb(paths: ReportPaths, save_dir: str | Path, mode: WandbMode | None = None,
                        project: str = "pellucid", run: Any = None) -> Path:
    """Log a written report (every metric, figure and the page itself) to a W&B run; returns the run's folder.

    Args:
        paths: The report's files.
        save_dir: Folder that receives ``wandb/`` when a new run is started.
        mode: ``"offline"`` (default), ``"online"`` or ``"disabled"`` for a new run.
        project: W&B project of a new run.
        run: An open run to log into (e.g. the training run of ``pellucid demo``); it is left open. Without it a new
            run named ``report-card`` is started and finished.
    """
    import wandb  # imported on first use, as in the logger

    report = json.loads(paths.json.read_text(encoding="utf-8"))
    payload: dict[str, Any] = {"report": wandb.Html(paths.html.read_text(encoding="utf-8"))}
    for role, model in report["models"].items():
        payload.update({f"{role}/task/{name}": value for name, value in model["task_metrics"].items()})
    for element, content in report["elements"].items():
        for metric in content["metrics"]:
            payload.update({f"{role}/five/{element}/{metric['name']}": metric[role] for role in report["models"]
                            if metric.get(role) is not None})
        for role, items in content["figures"].items():
            for number, item in enumerate(items):
                payload[f"{role}/explain/{element}/{number}"] = wandb.Image(str(paths.json.parent / item["file"]),
                                                                            caption=item["caption"])
    own_run = run is None
    if own_run:
        run = init_run(save_dir, project=project, name="report-card", mode=mode)
    run.log(payload)
    run_dir = Path(run.dir).parent
    if own_run:
        run.finish()
    return run_dir


def explain_and_report(ckpt: str | Path, data: str | Path | PellucidDataModule, out: str | Path,
                       baseline: str | Path | None = None, *, data_overrides: Mapping[str, Any] | None = None,
                       predict_batches: int | None = None, wandb_mode: WandbMode | None = None,
                       wandb_dir: str | Path | None = None, wandb_run: Any = None,
                       **report_options: Any) -> dict[str, Path]:
    """The demo story after training: explanations for every prediction, the report card, an offline W&B run.

    1. ``Trainer.predict`` with :class:`~pellucid.training.outputs.writer.ExplanationWriter` -> ``<out>/explanations``;
    2. :func:`write_report` (with ``baseline`` side by side when given) -> ``<out>/report``;
    3. :func:`log_report_to_wandb` -> ``wandb_run``, else a new run under ``<wandb_dir>/wandb`` (offline unless
       ``wandb_mode``/``WANDB_MODE`` says otherwise).

    Args:
        ckpt: Trained checkpoint (e.g. ProtoPNet's best checkpoint) or zoo name.
        data: Data config YAML or data module.
        out: Output folder.
        baseline: Optional baseline checkpoint (the black box with Grad-CAM).
        data_overrides: ``init_args`` replaced in the data config.
        predict_batches: Predict only this many batches.
        wandb_mode: ``"offline"`` (default), ``"online"`` or ``"disabled"``.
        wandb_dir: Folder that receives ``wandb/`` for a new run (default: ``out``).
        wandb_run: An open W&B run to log the report into (left open for its owner to finish).
        **report_options: Passed to :func:`write_report` (``limit_batches``, ``sanity_samples`` ...).

    Returns:
        Artefact name -> path: ``explanations``, ``index``, ``report_html``, ``report_json``, ``wandb_run``.
    """
    out = Path(out)
    datamodule = _datamodule(data, data_overrides)
    writer = ExplanationWriter(out / "explanations")
    trainer = pl.Trainer(accelerator=report_options.get("accelerator", "cpu"), devices=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[writer], limit_predict_batches=predict_batches)
    trainer.predict(load_module(ckpt), datamodule=datamodule, return_predictions=False)
    paths = write_report(ckpt, datamodule, out / "report", baseline, **report_options)
    run_dir = log_report_to_wandb(paths, out if wandb_dir is None else wandb_dir, mode=wandb_mode, run=wandb_run)
    return {"explanations": writer.output_dir, "index": writer.output_dir / INDEX_FILE, "report_html": paths.html,
            "report_json": paths.json, "wandb_run": run_dir}
