"""Model transparency: is the decision mechanism readable, and is the explanation faithful to it?

- The linear head over the explanation, through the protocol (:meth:`~pellucid.models.InterpretableModel.
  explanation_head`): exact logit reconstruction from the explanation, the head's sparsity, and the terms one
  decision reads (prototypes per decision for prototype heads).
- Contribution-based models (:meth:`~pellucid.models.InterpretableModel.logit_contributions`, e.g. B-cos): the logits
  rebuilt as the sum of their per-location contributions.
- Deletion faithfulness: how fast the class probability falls as the most-evidenced voxels are deleted (Petsiuk et
  al., "RISE", BMVC 2018), against the least-evidenced-first reference curve (Samek et al., IEEE TNNLS 2017); the
  curves, with tied evidence deleted as one block, live in :mod:`pellucid.training.elements.faithfulness`.

Per-batch measurements; the aggregation over an epoch lives in :mod:`pellucid.training.elements.evaluator`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pellucid.models import InterpretableModel, ModelOutput
from pellucid.models.explanation import LinearExplanationHead
from pellucid.training.elements.faithfulness import (  # re-exported: the deletion curves' old home
    DeletionBaseline,
    curve_area,
    deletion_curve,
    deletion_order,
)

__all__ = ["DeletionBaseline", "LinearExplanationHead", "contribution_reconstruction_error", "curve_area",
           "decision_terms", "deletion_curve", "deletion_order", "explanation_head", "head_sparsity",
           "logit_contributions", "logit_reconstruction"]


def explanation_head(model: nn.Module) -> LinearExplanationHead | None:
    """The model's linear head over its explanation, through the protocol; ``None`` for a model without one."""
    return model.explanation_head() if isinstance(model, InterpretableModel) else None


def logit_reconstruction(head: LinearExplanationHead, image: Tensor, output: ModelOutput,
                         tolerance: float = 1e-4) -> tuple[Tensor, Tensor]:
    """Recompute the logits from the explanation through the head.

    Returns:
        ``(error, exact)``: (B,) largest absolute logit difference per sample, and (B,) 1.0 where it is within
        ``tolerance * (1 + max |logit|)`` (float32 rounding), else 0.0.

    Raises:
        ValueError: when the head's shape does not fit the logits or the explanation.
    """
    if output.logits is None:
        raise ValueError("logit_reconstruction: the output has no logits")
    if head.weight.ndim != 2 or head.weight.shape[0] != output.logits.shape[1]:
        raise ValueError(f"explanation head ({head.source}): weight shape {tuple(head.weight.shape)} does not fit "
                         f"{output.logits.shape[1]} classes; expected ({output.logits.shape[1]}, D)")
    rebuilt = head.logits(image, output)
    error = (rebuilt - output.logits).abs().amax(dim=1)
    scale = output.logits.abs().amax(dim=1)
    return error, (error <= tolerance * (1.0 + scale)).float()


def logit_contributions(model: nn.Module, output: ModelOutput) -> Tensor | None:
    """(B, K, *S) contributions whose spatial sum is the logits, through the protocol; ``None`` for other models."""
    return model.logit_contributions(output) if isinstance(model, InterpretableModel) else None


def contribution_reconstruction_error(contributions: Tensor, logits: Tensor) -> Tensor:
    """(B,) relative error of the logits rebuilt as the sum of their contributions (B-cos: ``W(x) x``).

    Per sample ``max_k |Σ_s c[k, s] - z_k| / max_k |z_k|`` (summed in float64), so a sample's error is measured on
    the scale of its own logits; 0 where every logit and every sum is 0.

    Raises:
        ValueError: when the contributions are not (B, K, *S) for (B, K) logits.
    """
    if contributions.ndim < 3 or tuple(contributions.shape[:2]) != tuple(logits.shape):
        raise ValueError(f"contributions: expected (B, K, *S) with (B, K) = {tuple(logits.shape)}, got shape "
                         f"{tuple(contributions.shape)}")
    rebuilt = contributions.flatten(2).double().sum(dim=2)
    error = (rebuilt - logits.double()).abs().amax(dim=1)
    scale = logits.double().abs().amax(dim=1)
    return torch.where(error > 0, error / scale, torch.zeros_like(error)).float()


def decision_terms(head: LinearExplanationHead, image: Tensor, output: ModelOutput,
                   relative_tolerance: float = 1e-3) -> Tensor:
    """(B,) number of explanation entries that contribute to each sample's predicted class (prototypes per decision).

    Entry ``d`` contributes ``weight[k, d] * explanation[b, d]`` to the logit of the predicted class ``k``; it counts
    when its magnitude exceeds ``relative_tolerance`` times the sample's largest one (0 for a sample without any:
    e.g. a PIP-Net image in which no weighted prototype is present).
    """
    explanation = head.explanation(image, output).flatten(1).to(head.weight.dtype)
    predicted = output.logits.argmax(dim=1)
    contributions = (explanation * head.weight.detach()[predicted]).abs()
    peak = contributions.amax(dim=1, keepdim=True)
    return ((contributions > relative_tolerance * peak) & (peak > 0)).sum(dim=1).float()


def head_sparsity(weight: Tensor, relative_tolerance: float = 1e-3) -> tuple[float, float]:
    """Share of negligible weights (|w| <= tol * max|w|) and the mean number of non-negligible weights per class."""
    magnitude = weight.detach().abs()
    peak = float(magnitude.max()) if magnitude.numel() else 0.0
    negligible = magnitude <= relative_tolerance * peak
    return float(negligible.float().mean()), float((~negligible).sum(dim=1).float().mean())
