"""PIP-Net's loss terms and its two training views, as plain tensor functions (2D and 3D).

Nauta, Schlötterer, van Keulen, Seifert, "PIP-Net: Patch-Based Intuitive Prototypes for Interpretable Image
Classification", CVPR 2023, https://openaccess.thecvf.com/content/CVPR2023/html/Nauta_PIP-Net_Patch-Based_Intuitive_Prototypes_for_Interpretable_Image_Classification_CVPR_2023_paper.html.
Written from the paper; the public code (github.com/M-Nauta/PIPNet) was read for the constants only.

- :func:`alignment_loss`: the two views of an image should give every latent patch the same prototype: minus the log
  of the dot product of the two presence vectors (each a softmax over prototypes), averaged over patches, each side
  against a stopped-gradient copy of the other.
- :func:`tanh_uniformity_loss`: every prototype should be present somewhere in a batch: minus the mean over
  prototypes of ``log(tanh(sum over images of the prototype's pooled presence))``.
- :func:`patch_share_excess_loss` (our addition, opt-in): no prototype should hold more than a share ``cap`` of the
  batch's latent patches: the excess of the largest mean patch presence over ``cap``. The uniformity term only asks
  each prototype to be present somewhere; on the phantom one training seed in three let a single prototype take air
  and tissue alike (97 % of the patches), so that a normal scan and a blank image had the same presences and no
  abstention rule could tell them apart (docs/benchmarks/pipnet.md).
- :func:`scoring_classification_loss`: cross-entropy of the class scores read through ``log(1 + score^2)`` (the
  paper's normalisation of non-negative scores).
- :func:`training_view`: one randomly altered copy of a batch (intensity gain and offset, noise, a small shift), made
  with torch operations so the model can draw its two views inside ``forward``; :func:`geometric_view` mirrors the
  second view and moves it by whole latent cells, and :func:`undo_geometry` maps its presences back, so that the
  alignment compares the same content (our addition: trained from scratch on phantoms, without it the presences
  encoded the position in the frame, which two aligned views agree on trivially).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def alignment_loss(first: Tensor, second: Tensor, mask: Tensor | None = None, epsilon: float = 1e-8) -> Tensor:
    """Mean over latent patches of ``-log(z1 . z2)``, each view pulled towards the other's detached presences.

    Args:
        first: (B, P, *s) presence maps of the first view (a softmax over ``P`` at every location).
        second: (B, P, *s) presence maps of the second view, mapped back onto the first view's patches.
        mask: (B, *s) which patches both views show (``None``: all); the mean runs over these.
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
    weight = torch.ones_like(first[:, 0]) if mask is None else mask.to(first.dtype)
    total = weight.sum().clamp_min(1.0)
    towards_second = -(torch.log((first * second.detach()).sum(dim=1) + epsilon) * weight).sum() / total
    towards_first = -(torch.log((second * first.detach()).sum(dim=1) + epsilon) * weight).sum() / total
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


def patch_share_excess_loss(presence: Tensor, cap: float) -> Tensor:
    """``relu(max_p q_p - cap)``, ``q`` the mean presence over images and latent patches.

    0 while no prototype holds more than ``cap`` of the batch's patches.

    Args:
        presence: (B, P, *s) presence maps (a softmax over ``P`` at every patch).
        cap: Largest share of the patches one prototype may hold without cost.
    """
    if presence.ndim < 3:
        raise ValueError(f"patch_share_excess_loss: expected (B, P, *s) presence maps, got {tuple(presence.shape)}")
    share = presence.float().transpose(0, 1).flatten(1).mean(dim=1)  # (P,) sums to 1
    return F.relu(share.max() - cap)


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


def shift(x: Tensor, offsets: list[list[int]], fill: Tensor | float = 0.0) -> Tensor:
    """(B, C, *S) moved by ``offsets[b][axis]`` positions along each spatial axis (positive: towards higher indices).

    Positions uncovered by the move take ``fill`` (a number, or one value per sample, shape (B,)).
    """
    reach = max((abs(o) for row in offsets for o in row), default=0)
    if reach == 0:
        return x.clone()
    axes = x.ndim - 2
    padded = F.pad(x, [reach] * (2 * axes), value=0.0)
    if isinstance(fill, Tensor) or fill != 0.0:
        outside = F.pad(torch.zeros_like(x[:, :1]), [reach] * (2 * axes), value=1.0) > 0
        values = fill.view(-1, *[1] * (x.ndim - 1)).to(x) if isinstance(fill, Tensor) else torch.full_like(x[:1], fill)
        padded = torch.where(outside, values, padded)
    return torch.stack([padded[(b, slice(None), *[slice(reach - o, reach - o + n)
                                                  for o, n in zip(offsets[b], x.shape[2:], strict=True)])]
                        for b in range(x.shape[0])])


def flip(x: Tensor, flips: Tensor) -> Tensor:
    """(B, C, *S) with sample b mirrored along every spatial axis a where ``flips[b, a]`` is True."""
    for axis in range(flips.shape[1]):
        chosen = flips[:, axis].view(-1, *[1] * (x.ndim - 1))
        x = torch.where(chosen, x.flip(2 + axis), x)
    return x


def training_view(image: Tensor, gain: float = 0.2, offset: float = 0.05, noise: float = 0.02,
                  shift_by: int = 2) -> Tensor:
    """A randomly altered copy of ``image`` (B, C, *S) for the two-view losses; global torch RNG.

    Per sample: intensities scaled by a factor in ``[1 - gain, 1 + gain]`` and moved by an offset in
    ``[-offset, offset]``, Gaussian noise of standard deviation ``noise`` added, and the image shifted by up to
    ``shift_by`` pixels/voxels along every axis (uncovered positions take the sample's smallest value).
    """
    batch, spatial_dims = image.shape[0], image.ndim - 2
    shape = (batch, *[1] * (image.ndim - 1))
    factor = 1.0 + gain * (2.0 * torch.rand(shape, device=image.device, dtype=image.dtype) - 1.0)
    moved = offset * (2.0 * torch.rand(shape, device=image.device, dtype=image.dtype) - 1.0)
    view = image * factor + moved
    if noise > 0:
        view = view + noise * torch.randn_like(view)
    if shift_by <= 0:
        return view
    offsets = torch.randint(-shift_by, shift_by + 1, (batch, spatial_dims)).tolist()
    return shift(view, offsets, view.flatten(1).amin(dim=1))


def geometric_view(view: Tensor, stride: int, cells: int = 1, flips: bool = True) -> tuple[Tensor, list[list[int]],
                                                                                              Tensor]:
    """``view`` (B, C, *S) mirrored at random per axis, then moved by up to ``cells`` whole latent cells per axis.

    A latent patch of the result shows what another patch of ``view`` shows, and :func:`undo_geometry` maps the
    result's presence maps back; so the views disagree about where a patch sits in the frame, and presences that
    encode the position in the frame (zero padding makes that easy) cannot align, while presences of the content can.

    Returns:
        The moved view, the offsets in cells per sample and axis, and the (B, axes) mirror flags.
    """
    batch, axes = view.shape[0], view.ndim - 2
    mirror = torch.rand(batch, axes) < 0.5 if flips else torch.zeros(batch, axes, dtype=torch.bool)
    offsets = torch.randint(-cells, cells + 1, (batch, axes)).tolist()
    moved = shift(flip(view, mirror.to(view.device)), [[o * stride for o in row] for row in offsets],
                  view.flatten(1).amin(dim=1))
    return moved, offsets, mirror


def undo_geometry(maps: Tensor, offsets: list[list[int]], mirror: Tensor) -> tuple[Tensor, Tensor]:
    """(B, P, *s) presence maps of a :func:`geometric_view` mapped back onto the original view's patches.

    Returns:
        The maps (0 where the original patch was outside the moved view) and the (B, *s) mask of covered patches.
    """
    back = [[-o for o in row] for row in offsets]
    mirror = mirror.to(maps.device)
    covered = flip(shift(torch.ones_like(maps[:, :1]), back), mirror)[:, 0] > 0.5
    return flip(shift(maps, back), mirror), covered


__all__ = ["alignment_loss", "flip", "geometric_view", "scoring_classification_loss", "shift",
           "tanh_uniformity_loss", "training_view", "undo_geometry"]
