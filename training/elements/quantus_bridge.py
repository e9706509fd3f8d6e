"""Quantus bridge: hand a pellucid model and its own explanation to Quantus (Hedström et al., JMLR 24, 2023).

Quantus calls ``model(x)`` and expects logits (it applies ``.softmax`` to what comes back); a pellucid model returns a
:class:`~pellucid.models.ModelOutput`, and its explanation is part of that output rather than a post-hoc method.
The bridge is two pieces:

- :func:`quantus_model`: the model as a logits-only ``nn.Module`` in eval mode
  (:class:`~pellucid.training.elements.posthoc.LogitsOnly`), to pass as Quantus's ``model``;
- :func:`own_explanation`: a Quantus ``explain_func`` that returns the model's own ``localization`` maps of the target
  classes, ``(N, 1, *S)`` NumPy arrays at input resolution.

Example (``pip install "pellucid[eval]"``)::

    import quantus
    from pellucid.training.elements.quantus_bridge import lesion_images, own_explanation, quantus_model

    x, y, s = lesion_images(batch["image"], batch["label"], batch["mask"])
    scores = quantus.PointingGame(disable_warnings=True)(
        model=quantus_model(model), x_batch=x, y_batch=y, s_batch=s, explain_func=own_explanation, device="cpu")

On images with a lesion, Quantus's ``PointingGame`` and ``AttributionLocalisation`` give the values of pellucid's
:class:`~pellucid.training.elements.localization.PointingGame` and
:class:`~pellucid.training.elements.localization.EnergyInsideMask` (``tests/test_quantus_bridge.py``). Two things in
Quantus 0.6.0 (the release this was checked with) need care:

- its ``PointingGame`` scores an image without a lesion as a hit (it writes NaN into a boolean array, which reads as
  ``True``), where pellucid leaves such images out: pass only lesion images (:func:`lesion_images`);
- its AUC helper (faithfulness metrics: pixel flipping, region perturbation, selectivity, IROF) calls ``np.trapz``,
  which NumPy 2.4 removed. pellucid does not pin NumPy: :func:`patch_quantus_trapz` points that one helper at
  ``np.trapezoid`` (the same trapezoidal rule) when ``np.trapz`` is missing, and :func:`quantus_model` applies it.
  NumPy itself is left unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pellucid.training.elements.localization import evidence_maps
from pellucid.training.elements.posthoc import LogitsOnly

__all__ = ["lesion_images", "own_explanation", "patch_quantus_trapz", "quantus_model"]


def patch_quantus_trapz() -> bool:
    """Make Quantus's AUC helper work on NumPy >= 2.4 (no ``np.trapz``); returns whether it was patched.

    Only ``quantus.helpers.utils.calculate_auc`` is replaced, by the same computation through ``np.trapezoid``; with
    an older NumPy nothing changes.

    Raises:
        ImportError: when Quantus is not installed (``pip install "pellucid[eval]"``).
    """
    if hasattr(np, "trapz"):
        return False
    from quantus.helpers import utils

    if getattr(utils.calculate_auc, "pellucid_patched", False):
        return True

    def calculate_auc(values: np.ndarray, dx: int = 1, batched: bool = False) -> np.ndarray:
        return np.trapezoid(np.array(values), dx=dx, axis=1 if batched else -1)

    calculate_auc.pellucid_patched = True  # type: ignore[attr-defined]
    utils.calculate_auc = calculate_auc
    return True


def quantus_model(model: nn.Module) -> LogitsOnly:
    """``model`` as Quantus's ``model`` argument: a logits-only module in eval mode (the model is put in eval mode).

    Also applies :func:`patch_quantus_trapz` when Quantus is installed.
    """
    try:
        patch_quantus_trapz()
    except ImportError:
        pass
    return LogitsOnly(model.eval()).eval()


def own_explanation(model: nn.Module, inputs: np.ndarray | Tensor, targets: np.ndarray | Tensor | int,
                    **_: Any) -> np.ndarray:
    """Quantus ``explain_func``: the model's own localization of ``targets``, as (N, 1, *S) float32 NumPy maps.

    Args:
        model: What Quantus passes: the :func:`quantus_model` wrapper (or the pellucid model itself).
        inputs: (N, C, *S) images, channels first.
        targets: (N,) classes to explain (or one class for all).
        **_: Further keyword arguments Quantus passes (``explain_func_kwargs``, ``device``), ignored.

    Raises:
        ValueError: when the model returns no ``localization``.
    """
    network = model.model if isinstance(model, LogitsOnly) else model
    device = next(network.parameters()).device
    image = torch.as_tensor(np.asarray(inputs), dtype=torch.float32, device=device)
    classes = torch.as_tensor(np.asarray(targets), dtype=torch.long, device=device).reshape(-1).expand(image.shape[0])
    with torch.no_grad():
        maps = evidence_maps(network(image, explain=True), classes)
    if maps is None:
        name = getattr(network, "name", type(network).__name__)
        raise ValueError(f"own_explanation: {name} returns no localization (ModelOutput.localization is None); "
                         "there is no own explanation to hand to Quantus")
    return maps.unsqueeze(1).float().cpu().numpy()


def lesion_images(image: Tensor, label: Tensor, mask: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x_batch, y_batch, s_batch)`` NumPy arrays of the images whose mask is not empty.

    Quantus 0.6 counts an image without a lesion as a pointing-game hit; pellucid leaves such images out.

    Args:
        image: (N, C, *S) images.
        label: (N,) classes to explain (e.g. the predicted ones).
        mask: (N, 1, *S) lesion masks.
    """
    keep = mask.flatten(1).amax(dim=1) > 0
    return (image[keep].float().cpu().numpy(), label[keep].long().cpu().numpy(),
            (mask[keep] > 0).float().cpu().numpy())
