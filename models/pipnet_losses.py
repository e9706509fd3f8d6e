"""PIP-Net's loss terms and its two training views, as plain tensor functions (2D and 3D).

Nauta, Schlötterer, van Keulen, Seifert, "PIP-Net: Patch-Based Intuitive Prototypes for Interpretable Image
Classification", CVPR 2023, https://openaccess.thecvf.com/content/CVPR2023/html/Nauta_PIP-Net_Patch-Based_Intuitive_Prototypes_for_Interpretable_Image_Classification_CVPR_2023_paper.html.
Written from the paper; the public code (github.com/M-Nauta/PIPNet) was read for the constants only.

- :func:`alignment_loss`: the two views of an image should give every latent patch the same prototype: minus the log
  of the dot product of the two presence vectors (each a softmax over prototypes), averaged over patches, each side
  against a stopped-gradient copy of the other.
- :func:`tanh_uniformity_loss`: every prototype should be present somewhere in a batch: minus the mean over
  prototypes of ``log(tanh(sum over images of the prototype's pooled presence))``.
- :func:`scoring_classification_loss`: cross-entropy of the class scores read through ``log(1 + score^2)`` (the
  paper's normalisation of non-negative scores).
- :func:`training_view`: one randomly altered copy of a batch (intensity gain and offset, noise, a small shift), made
  with torch operations so the model can draw its two views inside ``forward``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def alignment_loss(first: Tensor, second: Tensor, epsilon: float = 1e-8) -> Tensor:
    """Mean over latent patches of ``-log(z1 . z2)``, each view pulled towards the other's detached presences.

    Args:
        first: (B, P, *s) presence maps of the first view (a softmax over ``P`` at every location).
        second: (B, P, *s) presence maps of the second view, same shape.
        epsilon: Added inside the log.

    Returns:
        A scalar: 0 when both views give every patch the same one-hot presence, larger otherwise.

    Raises:
        ValueError: when the shapes differ.
    """
    if first.shape != second.shape:
        raise ValueError(f"alignment_loss: the two views' presence maps must have one shape, got "
                         f"{tuple(first.shape)} and {tuple(second.shape)}")
    first, second = first.float(), second.float()
    towards_second = -torch.log((first * second.detach()).sum(dim=1) + epsilon).mean()
    towards_first = -torch.log((second * first.detach()).sum(dim=1) + epsilon).mean()
    return (towards_second + towards_first) / 2.0


def tanh_uniformity_loss(pooled: Tensor, epsilon: float = 1e-8) -> Tensor:
    """``-mean_p log(tanh(sum_b pooled[b, p]) + eps)``: zero once every prototype is clearly present in the batch.

    Args:
        pooled: (B, P) image-level presence of every prototype (max over locations).
        epsilon: Added inside the log (a prototype absent from the whole batch costs ``-log(eps)``).
    """
    if pooled.ndim != 2:
        raise ValueError(f"tanh_uniformity_loss: expected (B, P) pooled presences, got shape {tuple(pooled.shape)}")
    return -torch.log(torch.tanh(pooled.float().sum(dim=0)) + epsilon).mean()


def scoring_classification_loss(scores: Tensor, label: Tensor, exponent: float = 2.0) -> Tensor:
    """Cross-entropy of ``log(1 + scores^exponent)`` against class indices.

    Args:
        scores: (B, K) non-negative class scores of the scoring sheet.
        label: (B,) class indices.
        exponent: The power inside the log (the paper's fixed normalisation multiplier, 2).
    """
    if label.ndim != 1:
        raise ValueError(f"pipnet: expected (B,) class indices (multiclass), got labels of shape "
                         f"{tuple(label.shape)}; the scoring sheet has non-negative weights and no bias, so it has no "
                         "evidence against a label and cannot learn multi-label targets")
    return F.cross_entropy(torch.log1p(scores.float().clamp_min(0.0) ** exponent), label.long())


def training_view(image: Tensor, gain: float = 0.2, offset: float = 0.05, noise: float = 0.02,
                  shift: int = 4) -> Tensor:
    """A randomly altered copy of ``image`` (B, C, *S) for the two-view losses; global torch RNG.

    Per sample: intensities scaled by a factor in ``[1 - gain, 1 + gain]`` and moved by an offset in
    ``[-offset, offset]``, Gaussian noise of standard deviation ``noise`` added, and the image shifted by up to
    ``shift`` pixels/voxels along every axis (the uncovered border filled with the sample's smallest value). Both
    views of one image stay aligned up to the two shifts, so a latent patch of one view shows about what the same patch
    of the other shows (PIP-Net's views differ by a crop of at most one latent cell).
    """
    batch, spatial_dims = image.shape[0], image.ndim - 2
    shape = (batch, *[1] * (image.ndim - 1))
    factor = 1.0 + gain * (2.0 * torch.rand(shape, device=image.device, dtype=image.dtype) - 1.0)
    moved = offset * (2.0 * torch.rand(shape, device=image.device, dtype=image.dtype) - 1.0)
    view = image * factor + moved
    if noise > 0:
        view = view + noise * torch.randn_like(view)
    if shift <= 0:
        return view
    offsets = torch.randint(-shift, shift + 1, (batch, spatial_dims)).tolist()
    floor = view.flatten(1).amin(dim=1)
    padded = F.pad(view, [shift] * (2 * spatial_dims), value=0.0)
    pad_mask = F.pad(torch.zeros_like(view[:, :1]), [shift] * (2 * spatial_dims), value=1.0)
    padded = torch.where(pad_mask > 0, floor.view(shape), padded)
    size = image.shape[2:]
    crops = [padded[(b, slice(None), *[slice(shift - o, shift - o + n) for o, n in zip(offsets[b], size, strict=True)])]
             for b in range(batch)]
    return torch.stack(crops)


__all__ = ["alignment_loss", "scoring_classification_loss", "tanh_uniformity_loss", "training_view"]
