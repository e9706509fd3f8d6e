"""Export a trained model as a bundle (see :mod:`pellucid.models.pretrained`) and start training from one.

- :func:`export_bundle` writes ``weights.safetensors``, ``metadata.json`` (with the weights' sha256),
  ``config.yaml`` and a ``README.md`` model card, atomically (a half-written bundle never appears).
- :func:`initialise_from` loads a bundle, a ``.safetensors`` file or a Lightning checkpoint into a module for
  fine-tuning: tensors whose shape matches are copied; heads, prototypes or concept layers whose size changed
  keep their fresh initialisation, and the function says which.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from pellucid.models.concepts import ConceptSpec
from pellucid.models.pretrained import (
    BUNDLE_FORMAT,
    METADATA_FILE,
    WEIGHTS_FILE,
    read_metadata,
    resolve_bundle,
    sha256_of,
    verify_weights,
)
from pellucid.training import metrics as _task_metric_catalogue  # noqa: F401 (registers the task metrics)
from pellucid.training.checkpoint import read_checkpoint
from pellucid.training.elements import results as _five_element_catalogue  # noqa: F401 (registers the metrics)
from pellucid.training.elements.registry import metric_for_key
from pellucid.training.module import InterpretableModule


def _jsonable(value: Any) -> Any:
    if isinstance(value, ConceptSpec):
        return value.to_dict()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def split_state(model: torch.nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The state dict as (tensors for safetensors, JSON-able extra state such as prototype provenance).

    Raises:
        TypeError: naming a non-tensor state entry that JSON cannot hold.
    """
    tensors, extra = {}, {}
    for key, value in model.state_dict().items():
        if isinstance(value, Tensor):
            tensors[key] = value.detach().cpu().clone().contiguous()  # clone: safetensors refuses shared storage
        else:
            try:
                json.dumps(value)
            except TypeError as error:
                raise TypeError(f"state entry {key!r} ({type(value).__name__}) is not JSON-serialisable, so it "
                                f"cannot go into a bundle: {error}") from error
            extra[key] = value
    return tensors, extra


def export_bundle(
    module: InterpretableModule,
    out: str | Path,
    name: str,
    *,
    version: str = "1.0.0",
    description: str = "",
    config_path: str | Path | None = None,
    data: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    input_spec: dict[str, Any] | None = None,
) -> Path:
    """Write ``module``'s model as a bundle folder ``out`` (replaced atomically if it exists).

    Args:
        module: The trained module (its model, spec, classes and concepts are recorded).
        out: Bundle folder to write.
        name: Zoo name of the bundle.
        version: Bundle version.
        description: One paragraph for the model card.
        config_path: The training config (copied as ``config.yaml``).
        data: Description of the training data (dataset, splits, seed, ...).
        metrics: Measured metrics (headline numbers shown by ``pellucid zoo``).
        input_spec: Channels, spacing and intensity normalisation the model expects.
    """
    out = Path(out)
    model = module.model
    tensors, extra = split_state(model)
    spec_kwargs = _jsonable(dict(model.model_spec.kwargs))
    hparams = module.hparams
    out.parent.mkdir(parents=True, exist_ok=True)  # staged beside ``out``: the final rename stays on one filesystem
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    try:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt", "pellucid_bundle": name})
        metadata = {
            "bundle_format": BUNDLE_FORMAT,
            "name": name,
            "version": version,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "description": description,
            "model": {"name": model.model_spec.name, "kwargs": spec_kwargs},
            "spatial_dims": model.spatial_dims,
            "input": {"channels": model.in_channels, **(input_spec or {})},
            "task": hparams.get("task"),
            "classes": hparams.get("class_names") or [f"class{i}" for i in range(model.num_classes)],
            "concepts": hparams.get("concepts"),
            "extra_state": extra,
            "training": {"data": data or {}, "config": "config.yaml" if config_path else None},
            "metrics": metrics or {},
            "weights_sha256": sha256_of(staging / WEIGHTS_FILE),
            "software": {"torch": torch.__version__, "python": platform.python_version()},
        }
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        if config_path:
            shutil.copyfile(config_path, staging / "config.yaml")
        (staging / "README.md").write_text(model_card(metadata))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _swap_in(staging, out)
    return out


def _swap_in(staging: Path, out: Path) -> None:
    """Make ``staging`` the folder ``out`` by renames only: an existing bundle is moved aside, then deleted.

    A reader never sees a half-deleted or half-written bundle (between the two renames the name is briefly absent);
    if the final rename fails, the old bundle is put back.
    """
    previous = None
    try:
        if out.exists():
            previous = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
            os.replace(out, previous / "bundle")
        os.replace(staging, out)
    except BaseException:
        if previous is not None and not out.exists() and (previous / "bundle").exists():
            os.replace(previous / "bundle", out)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)


def _plain(value: Any) -> str:
    """A metadata value as readable text: dicts as ``key: value; ...``, lists comma-separated."""
    if isinstance(value, dict):
        return "; ".join(f"{key}: {_plain(item)}" for key, item in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_plain(item) for item in value)
    return str(value)


def _described(key: str, value: Any) -> str:
    """``value`` with its unit, direction and definition, read from the metric registered under ``key``'s name."""
    shown = f"{value:.4f}" if isinstance(value, float) else str(value)
    metric = metric_for_key(key)
    if metric is None:
        return shown
    direction = {True: " (higher is better)", False: " (lower is better)"}.get(metric.higher_is_better, "")
    unit = f" {metric.unit}" if metric.unit else ""
    return f"{shown}{unit}{direction}: {metric.definition}"


def metric_definitions(metadata: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each metric of a bundle's metadata with its registered definition (old keys through the registry's alias map).

    Returns:
        key -> ``{"name", "element", "definition", "unit", "higher_is_better", "value"}``; a key no registered
        metric matches maps to the value alone with ``"definition": None``.
    """
    described = {}
    for key, value in (metadata.get("metrics") or {}).items():
        metric = metric_for_key(key)
        described[key] = {"value": value, "name": None, "element": None, "definition": None, "unit": None,
                          "higher_is_better": None}
        if metric is not None:
            described[key].update(name=metric.name, element=metric.element, definition=metric.definition,
                                  unit=metric.unit, higher_is_better=metric.higher_is_better)
    return described


def model_card(metadata: dict[str, Any]) -> str:
    """A README model card from a bundle's metadata: what it is, what it was trained on, what was measured."""
    lines = [f"# {metadata['name']} (v{metadata['version']})", "", metadata.get("description") or "", "",
             "| | |", "|---|---|",
             f"| architecture | `{metadata['model']['name']}` ({metadata['spatial_dims']}D) |",
             f"| input | {_plain(metadata['input'])} |",
             f"| classes | {', '.join(map(str, metadata['classes']))} |"]
    if metadata.get("concepts"):
        named = [f"{c['name']} ({c['unit']})" if c.get("unit") else c["name"] for c in metadata["concepts"]]
        lines.append(f"| concepts | {', '.join(named)} |")
    lines += [f"| training data | {_plain(metadata['training']['data'])} |",
              f"| weights sha256 | `{metadata['weights_sha256']}` |", "",
              "## Intended use and limits", "",
              "A starting point for fine-tuning and a reference for what this architecture's explanations look like. "
              "Trained on the data named above; a model trained on the synthetic phantom benchmark has never seen a "
              "patient and is not validated for any clinical use.", "", "## Measured metrics", ""]
    metrics = metadata.get("metrics") or {}
    groups: dict[str, list[str]] = {}
    for key, value in sorted(metrics.items()):
        group = key.partition("/")[0] if "/" in key else "metrics"
        groups.setdefault(group, []).append(f"- {key}: {_described(key, value)}")
    for group, rows in groups.items():
        lines += [f"**{group.replace('_', ' ')}**", "", *rows, ""]
    if not metrics:
        lines += ["(none recorded)", ""]
    else:
        lines += ["Definitions come from pellucid's metric registry (`pellucid.training.elements.registry`); the "
                  f"report card shows them beside every figure (`pellucid report --ckpt {metadata['name']} "
                  "--data <data config> --out <folder>`).", ""]
    lines += ["## Use", "", "```python", "from pellucid.models.pretrained import load_pretrained",
              f"model, metadata = load_pretrained({metadata['name']!r})", "```", "",
              "Fine-tune: `pellucid fit --config <your config> --init_from " + metadata["name"] + "`.", ""]
    return "\n".join(lines)


def _source_state(source: str | Path) -> tuple[dict[str, Any], str]:
    """Tensors to initialise from, and a description of where they came from."""
    path = Path(source)
    if path.suffix == ".safetensors" and path.is_file():
        return dict(load_file(str(path))), f"safetensors file {path}"
    if path.suffix == ".ckpt" and path.is_file():
        checkpoint = read_checkpoint(path)  # weights_only: tensors and plain containers, no code from the file
        state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
        return state, f"Lightning checkpoint {path}"
    bundle = resolve_bundle(source)
    metadata = read_metadata(bundle)
    verify_weights(bundle, metadata)
    state: dict[str, Any] = dict(load_file(str(bundle / WEIGHTS_FILE)))
    state.update(metadata.get("extra_state", {}))
    return state, f"bundle {metadata['name']} ({bundle})"


def initialise_from(module: InterpretableModule, source: str | Path) -> list[str]:
    """Copy matching weights from ``source`` into ``module.model``; return one line per decision.

    Tensors with the same name and shape are copied. Tensors whose shape differs (a head for another number of
    classes, other prototypes or concepts) keep their fresh initialisation; tensors the source lacks too.
    """
    state, origin = _source_state(source)
    target = module.model.state_dict()
    loadable, report = {}, [f"initialising {module.model.name} from {origin}"]
    reinitialised: set[str] = set()  # modules with a re-initialised tensor
    for key, value in target.items():
        if key not in state:
            report.append(f"  kept fresh (absent from source): {key}")
        elif isinstance(value, Tensor) and isinstance(state[key], Tensor) and value.shape != state[key].shape:
            report.append(f"  re-initialised {key}: source shape {tuple(state[key].shape)}, "
                          f"this model {tuple(value.shape)}")
            reinitialised.add(key.rpartition(".")[0])
        elif isinstance(value, Tensor):
            loadable[key] = state[key]
    for key, value in target.items():  # non-tensor state (e.g. prototype provenance) describes its module's tensors
        if key in state and not isinstance(value, Tensor):
            if key.rpartition(".")[0] in reinitialised:
                report.append(f"  kept fresh {key}: its module's tensors were re-initialised")
            else:
                loadable[key] = state[key]
    unused = sorted(set(state) - set(target))
    if unused:
        report.append(f"  ignored {len(unused)} source tensor(s) this model does not have: {', '.join(unused[:5])}")
    module.model.load_state_dict(loadable, strict=False)
    report.append(f"  copied {len(loadable)} of {len(target)} tensors")
    report.extend(module.model.forget_training_data())  # the source's provenance describes the source's data
    return report
