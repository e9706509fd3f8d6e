"""Grad-CAM localization (Selvaraju et al., ICCV 2017) from a feature map and the head that reads it.

Used by the black-box baseline so that its post-hoc explanation passes through the same
``ModelOutput.localization`` contract as the transparent models.

The gradient of a logit with respect to the feature map only flows through the head (pooling and a linear
layer), so the maps are computed from the forward pass the prediction already made: one backward pass per class
through the head alone, no second forward through the backbone and no parameter gradients. In eval mode this
equals ``monai.visualize.GradCAM`` (which runs a forward and a full backward per class; tests compare the two).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pellucid.models.maps import upsample_evidence


def normalize_per_map(maps: Tensor) -> Tensor:
    """Scale each (sample, channel) map linearly to [0, 1]; a constant map becomes all zeros.

    MONAI's default normaliser maps (min, max) to (1, 0), i.e. it flips the map; Grad-CAM needs the
    high end to stay high, hence this replacement.
    """
    flat = maps.flatten(2)
    low = flat.amin(dim=2, keepdim=True)  # amin/amax: no index tensors, several times faster than min/max
    span = flat.amax(dim=2, keepdim=True) - low
    # dividing by inf turns a constant map into zeros without a full-size torch.where
    span = torch.where(span > 0, span, torch.full_like(span, math.inf))
    return ((flat - low) / span).clamp_(0.0, 1.0).view_as(maps)


def grad_cam(head: Callable[[Tensor], Tensor], features: Tensor, size: Sequence[int], num_classes: int,
             interpolation: str = "linear") -> Tensor:
    """Grad-CAM map of every class at input resolution.

    Args:
        head: Maps the (B, F, *s) feature map to (B, K) logits (e.g. pooling + linear classifier).
        features: (B, F, *s) feature map the head reads (Grad-CAM's target layer output).
        size: Spatial size ``*S`` of the input image.
        num_classes: ``K``; one backward pass through ``head`` per class.
        interpolation: Upsampling of the maps, ``"linear"`` (as Selvaraju et al.) or ``"cubic"`` (see
            :func:`~pellucid.models.maps.upsample_evidence`).

    Returns:
        (B, K, *S) float32 maps in [0, 1], detached.
    """
    # Lightning evaluates under inference mode; Grad-CAM needs autograd, on a normal (non-inference) copy.
    # Detached: the maps never send gradients into the model (no parameter .grad is touched).
    with torch.inference_mode(False), torch.enable_grad():
        activations = (features.clone() if features.is_inference() else features.detach()).requires_grad_(True)
        logits = head(activations)
        maps = []
        for k in range(num_classes):
            (gradient,) = torch.autograd.grad(logits[:, k].sum(), activations, retain_graph=k < num_classes - 1)
            weights = gradient.flatten(2).mean(dim=2).view(*gradient.shape[:2], *([1] * (gradient.ndim - 2)))
            maps.append(F.relu((weights * activations.detach()).sum(dim=1, keepdim=True)))
        cam = torch.cat(maps, dim=1)
    return normalize_per_map(upsample_evidence(cam, size, interpolation))
