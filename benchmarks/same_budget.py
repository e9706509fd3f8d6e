"""A baseline trained for comparison gets the compared config's training budget (epochs, augmentation) and backbone.

The evaluation scripts train the black-box baseline (``configs/experiments/blackbox_phantom2d.yaml``) beside the
model they evaluate. A comparison is only fair when both see the same data for as long, so the baseline is trained
with the evaluated config's ``trainer.max_epochs`` and ``data.init_args.augment``, passed as CLI overrides; where
the comparison is "same backbone", :func:`same_backbone_overrides` also passes the evaluated config's backbone.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def same_budget_overrides(config: str | Path) -> list[str]:
    """CLI overrides that give another phantom config the epochs and augmentation of ``config``.

    Raises:
        ValueError: naming the file when it sets no ``trainer.max_epochs``.
    """
    settings = yaml.safe_load(Path(config).read_text()) or {}
    epochs = (settings.get("trainer") or {}).get("max_epochs")
    if not isinstance(epochs, int) or isinstance(epochs, bool):
        raise ValueError(f"{config}: expected an integer trainer.max_epochs to match the baseline's budget to, "
                         f"got {epochs!r}")
    augment = bool(((settings.get("data") or {}).get("init_args") or {}).get("augment", False))
    return [f"--trainer.max_epochs={epochs}", f"--data.init_args.augment={str(augment).lower()}"]


def same_backbone_overrides(config: str | Path) -> list[str]:
    """CLI overrides that give another config the backbone (``model_kwargs.backbone`` and its kwargs) of ``config``.

    ``backbone_kwargs`` travels whole, as one JSON mapping: a per-key override (``...backbone_kwargs.strides=``)
    would replace the baseline's mapping with that one key, and ``pellucid`` refuses it (see
    :func:`pellucid.training.cli.nested_override_problems`).

    Raises:
        ValueError: naming the file when ``model.model_kwargs.backbone_kwargs`` is not a mapping.
    """
    settings = yaml.safe_load(Path(config).read_text()) or {}
    model_kwargs = ((settings.get("model") or {}).get("model_kwargs")) or {}
    backbone_kwargs = model_kwargs.get("backbone_kwargs") or {}
    if not isinstance(backbone_kwargs, dict):
        raise ValueError(f"{config}: expected model.model_kwargs.backbone_kwargs to be a mapping, "
                         f"got {backbone_kwargs!r}")
    overrides = [f"--model.model_kwargs.backbone={model_kwargs['backbone']}"] if "backbone" in model_kwargs else []
    if backbone_kwargs:
        overrides.append(f"--model.model_kwargs.backbone_kwargs={json.dumps(backbone_kwargs)}")
    return overrides
