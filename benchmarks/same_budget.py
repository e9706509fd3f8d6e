"""A baseline trained for comparison gets the compared config's training budget: its epochs and its augmentation.

The evaluation scripts train the black-box baseline (``configs/experiments/blackbox_phantom2d.yaml``) beside the
model they evaluate. A comparison is only fair when both see the same data for as long, so the baseline is trained
with the evaluated config's ``trainer.max_epochs`` and ``data.init_args.augment``, passed as CLI overrides.
"""

from __future__ import annotations

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
