"""Grad-CAM localization for any model, computed with ``monai.visualize.GradCAM``.

Used by the black-box baseline so that its post-hoc explanation passes through the same
``ModelOutput.localization`` contract as the transparent models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from monai.visualize import GradCAM
from torch import Tensor, nn


def normalize_per_map(maps: Tensor) -> Tensor:
    """Scale each (sample, channel) map linearly to [0, 1]; a constant map becomes all zeros.

    MONAI's default normaliser maps (min, max) to (1, 0), i.e. it flips the map; Grad-CAM needs the
    high end to stay high, hence this replacement.
    """
    flat = maps.flatten(2)
    low = flat.min(dim=2, keepdim=True).values
    span = flat.max(dim=2, keepdim=True).values - low
    scaled = torch.where(span > 0, (flat - low) / span.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return scaled.view_as(maps).clamp(0.0, 1.0)


class _LogitsOnly(nn.Module):
    """Adapter so GradCAM can call a model that returns logits directly."""

    def __init__(self, logits_fn: Callable[[Tensor], Tensor], target: nn.Module) -> None:
        super().__init__()
        self.logits_fn = logits_fn
        self.target = target  # registered so GradCAM finds it by the name "target"

    def forward(self, x: Tensor) -> Tensor:
        return self.logits_fn(x)


@contextmanager
def _hooks_removed_after(module: nn.Module) -> Iterator[None]:
    """Remove the hooks that MONAI registers (it keeps no handles) once the block ends."""
    forward_before = set(module._forward_hooks)
    backward_before = set(module._backward_hooks)
    try:
        yield
    finally:
        for key in set(module._forward_hooks) - forward_before:
            del module._forward_hooks[key]
        for key in set(module._backward_hooks) - backward_before:
            del module._backward_hooks[key]


def grad_cam(
    logits_fn: Callable[[Tensor], Tensor],
    target_layer: nn.Module,
    image: Tensor,
    num_classes: int,
) -> Tensor:
    """Grad-CAM map of every class at input resolution.

    Args:
        logits_fn: Maps an image batch to (B, K) logits and runs ``target_layer`` on the way.
        target_layer: The module whose output feature map Grad-CAM weights (it must not be used in place).
        image: (B, C, *S) input.
        num_classes: ``K``; one backward pass per class.

    Returns:
        (B, K, *S) maps in [0, 1].

    Note:
        MONAI's GradCAM puts the network in eval mode for the passes and zeroes its gradients; call it
        outside of a gradient-accumulation window (validation, test, prediction).
    """
    view = _LogitsOnly(logits_fn, target_layer)
    # Lightning evaluates under inference mode; Grad-CAM needs autograd, on a normal (non-inference) copy.
    with torch.inference_mode(False), torch.enable_grad(), _hooks_removed_after(target_layer):
        # requires_grad on the input keeps the feature map differentiable even when every parameter
        # before it is frozen (e.g. a warm-up phase), so the backward hook always fires.
        x = (image.clone() if image.is_inference() else image.detach()).requires_grad_(True)
        cam = GradCAM(nn_module=view, target_layers="target", postprocessing=normalize_per_map)
        maps = [cam(x, class_idx=k) for k in range(num_classes)]
    return torch.cat(maps, dim=1).detach()
