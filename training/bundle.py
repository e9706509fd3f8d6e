"""Export a trained model as a bundle (see :mod:`pellucid.models.pretrained`) and start training from one.

- :func:`export_bundle` writes ``weights.safetensors``, ``metadata.json`` (with the weights' sha256),
  ``config.yaml``, a ``README.md`` model card and ``SHA256SUMS`` (the sha256 of every other file), atomically (a
  half-written bundle never appears).
- :func:`write_checksums` (``python -m pellucid.training.bundle <bundle folder>...``) adds ``SHA256SUMS`` to a bundle
  exported before it existed.
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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from pellucid.models.concepts import ConceptSpec
from pellucid.models.pretrained import (
    BUNDLE_FORMAT,
    CHECKSUMS_FILE,
    METADATA_FILE,
    WEIGHTS_FILE,
    BundleError,
    bundle_files,
    read_metadata,
    resolve_bundle,
    sha256_of,
    verify_bundle,
)
from pellucid.training import metrics as _task_metric_catalogue  # noqa: F401 (registers the task metrics)
from pellucid.training.bundle_seeds import record_seed_summary as record_seed_summary  # the scripts' API
from pellucid.training.bundle_seeds import seed_summary_lines
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
        write_checksums(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _swap_in(staging, out)
    return out


def write_checksums(bundle: str | Path) -> Path:
    """Write ``SHA256SUMS``: the sha256 of every other file of the bundle folder (replacing an existing one).

    The weights must still match the ``weights_sha256`` of ``metadata.json``: this vouches for the files as they are,
    it does not repair a tampered bundle.

    Args:
        bundle: The bundle folder.

    Raises:
        BundleError: when the folder is not a bundle or its weights differ from ``weights_sha256``.
    """
    bundle = Path(bundle)
    metadata = read_metadata(bundle)
    digests = {name: sha256_of(bundle / name) for name in bundle_files(bundle)}  # each file read once
    if digests.get(WEIGHTS_FILE) != metadata["weights_sha256"]:
        raise BundleError(f"bundle {bundle}: {WEIGHTS_FILE} has sha256 {digests.get(WEIGHTS_FILE)}, metadata.json "
                          f"expects {metadata['weights_sha256']}; refusing to vouch for changed weights")
    lines = [f"{digest}  {name}\n" for name, digest in digests.items()]
    path = bundle / CHECKSUMS_FILE
    partial = path.with_name(f".{CHECKSUMS_FILE}.partial")
    partial.write_text("".join(lines))
    os.replace(partial, path)  # atomic: a reader sees the old list or the new, never half of one
    return path


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
    lines += seed_summary_lines(metadata.get("seed_summary"))
    lines += ["## Use", "", "```python", "from pellucid.models.pretrained import load_pretrained",
              f"model, metadata = load_pretrained({metadata['name']!r})", "```", "",
              "Fine-tune: `pellucid fit --config <your config> --init_from " + metadata["name"] + "`.", ""]
    return "\n".join(lines)


class InitialisationError(ValueError):
    """``--init_from`` refused: the source is of another spatial dimensionality or task, or too little of it fits."""


def _source_state(source: str | Path) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """Tensors to initialise from, a description of where they came from, and the source's ``spatial_dims``/``task``.

    The facts are what the source records (a bundle's metadata, a checkpoint's hyper-parameters); a bare
    ``.safetensors`` file records none.
    """
    path = Path(source)
    if path.suffix == ".safetensors" and path.is_file():
        return dict(load_file(str(path))), f"safetensors file {path}", {}
    if path.suffix == ".ckpt" and path.is_file():
        checkpoint = read_checkpoint(path)  # weights_only: tensors and plain containers, no code from the file
        state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
        hparams = checkpoint.get(InterpretableModule.CHECKPOINT_HYPER_PARAMS_KEY) or {}
        facts = {key: hparams[key] for key in ("spatial_dims", "task") if hparams.get(key) is not None}
        return state, f"Lightning checkpoint {path}", facts
    bundle = resolve_bundle(source)
    metadata = read_metadata(bundle)
    verify_bundle(bundle, metadata)
    state: dict[str, Any] = dict(load_file(str(bundle / WEIGHTS_FILE)))
    state.update(metadata.get("extra_state", {}))
    facts = {key: metadata[key] for key in ("spatial_dims", "task") if metadata.get(key) is not None}
    return state, f"bundle {metadata['name']} ({bundle})", facts


@dataclass
class _Plan:
    """What :func:`initialise_from` copies, re-initialises and keeps fresh, before anything is loaded."""

    loadable: dict[str, Any] = field(default_factory=dict)
    copied: list[str] = field(default_factory=list)  # tensor keys
    lines: list[str] = field(default_factory=list)
    total: int = 0  # tensors of the target


def _plan(target: dict[str, Any], state: dict[str, Any]) -> _Plan:
    plan, reinitialised = _Plan(), set()  # reinitialised: modules with a re-initialised tensor
    for key, value in target.items():
        if not isinstance(value, Tensor):
            continue
        plan.total += 1
        if key not in state:
            plan.lines.append(f"  kept fresh (absent from source): {key}")
        elif not isinstance(state[key], Tensor) or value.shape != state[key].shape:
            shape = tuple(state[key].shape) if isinstance(state[key], Tensor) else type(state[key]).__name__
            plan.lines.append(f"  re-initialised {key}: source shape {shape}, this model {tuple(value.shape)}")
            reinitialised.add(key.rpartition(".")[0])
        else:
            plan.loadable[key] = state[key]
            plan.copied.append(key)
    for key, value in target.items():  # non-tensor state (e.g. prototype provenance) describes its module's tensors
        if key in state and not isinstance(value, Tensor):
            if key.rpartition(".")[0] in reinitialised:
                plan.lines.append(f"  kept fresh {key}: its module's tensors were re-initialised")
            else:
                plan.loadable[key] = state[key]
    return plan


def _by_module(keys: list[str]) -> str:
    """``backbone (53), classifier (2)``: tensor counts per top-level module."""
    counts: dict[str, int] = {}
    for key in keys:
        counts[key.partition(".")[0]] = counts.get(key.partition(".")[0], 0) + 1
    return ", ".join(f"{name} ({count})" for name, count in counts.items())


def _mismatch(module: InterpretableModule, facts: dict[str, Any]) -> list[str]:
    """How the source differs from ``module`` in spatial dimensionality or task (empty when it does not)."""
    ours = {"spatial_dims": module.model.spatial_dims, "task": module.hparams.get("task")}
    return [f"{key} {facts[key]!r} (this model: {ours[key]!r})" for key in ("spatial_dims", "task")
            if key in facts and ours[key] is not None and facts[key] != ours[key]]


def initialise_from(module: InterpretableModule, source: str | Path, partial: bool = False) -> list[str]:
    """Copy matching weights from ``source`` into ``module.model``; return one line per decision.

    Tensors with the same name and shape are copied. Tensors whose shape differs (a head for another number of
    classes, other prototypes or concepts) keep their fresh initialisation; tensors the source lacks too. The lines
    name every tensor that was not copied, and count the copied ones per module.

    A source of another ``spatial_dims`` or task (a 2D bundle into a 3D model, a segmenter into a classifier), or one
    of which fewer than half of this model's tensors fit, is refused unless ``partial`` asks for the partial copy.

    Args:
        module: The module to initialise (its model is changed in place).
        source: A zoo bundle name, a bundle folder, a ``.safetensors`` file or a Lightning ``.ckpt``.
        partial: Copy what fits even from a source of another spatial_dims or task, or one that mostly does not fit.

    Raises:
        InitialisationError: naming the source, how it differs and the flag, before anything is copied.
    """
    state, origin, facts = _source_state(source)
    target = module.model.state_dict()
    plan = _plan(target, state)
    differences = _mismatch(module, facts)
    too_little = 2 * len(plan.copied) < plan.total
    if (differences or too_little) and not partial:
        why = [f"its {d}" for d in differences] + ([f"only {len(plan.copied)} of this model's {plan.total} tensors "
                                                    "have the same name and shape"] if too_little else [])
        raise InitialisationError(f"--init_from {source}: refusing to initialise {module.model.name} from {origin}: "
                                  f"{'; '.join(why)}; pick a source of the same spatial_dims and task, or pass "
                                  "--init_partial true to copy the tensors that fit and keep the rest fresh")
    report = [f"initialising {module.model.name} from {origin}"]
    summary = f": {_by_module(plan.copied)}" if plan.copied else ""
    report.append(f"  copied {len(plan.copied)} of {plan.total} tensors{summary}")
    report.extend(plan.lines)
    if len(plan.copied) == plan.total:
        report.append("  re-initialised nothing: every tensor of this model comes from the source")
    elif differences:
        report.append(f"  partial copy (--init_partial) from a source of another {', '.join(differences)}")
    unused = sorted(set(state) - set(target))
    if unused:
        report.append(f"  ignored {len(unused)} source tensor(s) this model does not have: {', '.join(unused[:5])}")
    module.model.load_state_dict(plan.loadable, strict=False)
    report.extend(module.model.forget_training_data())  # the source's provenance describes the source's data
    return report


def main(argv: list[str] | None = None) -> None:
    """``python -m pellucid.training.bundle <bundle folder>...``: write each folder's ``SHA256SUMS`` and verify it."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pellucid.training.bundle",
                                     description="write SHA256SUMS (the sha256 of every file) into bundle folders")
    parser.add_argument("bundles", nargs="+", help="bundle folders (holding metadata.json and weights.safetensors)")
    for folder in parser.parse_args(argv).bundles:
        path = write_checksums(folder)
        verify_bundle(Path(folder), read_metadata(Path(folder)))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
