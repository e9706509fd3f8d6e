"""Grad-CAM localization (Selvaraju et al., ICCV 2017) from a feature map and the head that reads it.

Used by the black-box baseline so that its post-hoc explanation passes through the same
``ModelOutput.localization`` contract as the transparent models.

The gradient of a logit with respect to the feature map only flows through the head (pooling and a linear
layer), so the maps are computed from the forward pass the prediction already made: one backward pass per class
through the head alone, no second forward through the backbone and no parameter gradients. In eval mode this
equals ``monai.visualize.GradCAM`` (which runs a forward and a full backward per class; tests compare the two).

When the head is global average pooling followed by one linear layer (nothing in between but the identity), the
gradient of logit ``k`` with respect to the feature map is ``W_k / N`` at every one of the ``N`` cells, so Grad-CAM's
channel weights are ``W_k / N`` exactly and its map is the class activation map of Zhou et al. (CVPR 2016):
:func:`linear_head_grad_cam` computes it in closed form, without a backward pass.
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
    return _normalize(maps.flatten(2), in_place=False).view_as(maps)


def normalize_per_map_(maps: Tensor) -> Tensor:
    """:func:`normalize_per_map` in place on a contiguous ``maps`` the caller owns (no full-size allocation)."""
    _normalize(maps.view(*maps.shape[:2], -1), in_place=True)
    return maps


def _normalize(flat: Tensor, in_place: bool) -> Tensor:
    low = flat.amin(dim=2, keepdim=True)  # amin/amax: no index tensors, several times faster than min/max
    span = flat.amax(dim=2, keepdim=True) - low
    # dividing by inf turns a constant map into zeros without a full-size torch.where
    span = torch.where(span > 0, span, torch.full_like(span, math.inf))
    # in place after the subtraction: fresh full-size pages cost as much as the arithmetic on them
    return (flat.sub_(low) if in_place else flat.sub(low)).div_(span).clamp_(0.0, 1.0)


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


def linear_head_grad_cam(weight: Tensor, features: Tensor, size: Sequence[int],
                         interpolation: str = "linear") -> Tensor:
    """Grad-CAM of a global-average-pooling + linear head in closed form (no backward pass).

    Only exact for that head: the gradient of logit ``k`` with respect to every cell of the (B, F, *s) feature map is
    ``weight[k] / N`` (``N`` cells), so the channel weights Grad-CAM averages from it are ``weight / N`` and the map is
    ``ReLU(sum_c weight[k, c] / N * features[:, c])``, the same values as :func:`grad_cam` (the tests compare the two
    and ``monai.visualize.GradCAM`` to 1e-5; on the shipped bundles they are bitwise equal). A max-pooled head,
    dropout in training mode or a nonlinearity after the pooling needs :func:`grad_cam`.

    Args:
        weight: (K, F) weight of the linear layer after the average pooling.
        features: (B, F, *s) feature map the pooling reads.
        size: Spatial size ``*S`` of the input image.
        interpolation: ``"linear"`` or ``"cubic"``, as :func:`grad_cam`.

    Returns:
        (B, K, *S) float32 maps in [0, 1], detached.
    """
    with torch.no_grad(), torch.autocast(features.device.type, enabled=False):
        cells = math.prod(features.shape[2:])
        # the gradient at every cell, averaged over the cells as Grad-CAM does: the same rounding as the
        # autograd path (bitwise equal maps on the shipped bundles), for K * F * N elements, next to nothing
        gradient = (weight.detach().float() / cells).unsqueeze(2).expand(*weight.shape, cells).contiguous()
        channel_weights = gradient.mean(dim=2).view(*weight.shape, *([1] * (features.ndim - 2)))
        activations = features.detach().float()
        cam = activations.new_empty(activations.shape[0], weight.shape[0], *activations.shape[2:])
        weighted = torch.empty_like(activations)  # one (B, F, *s) buffer for every class
        for k in range(weight.shape[0]):
            cam[:, k] = torch.mul(channel_weights[k], activations, out=weighted).sum(dim=1)
        cam.relu_()
        return normalize_per_map_(upsample_evidence(cam, size, interpolation))  # a new contiguous map of its own
