"""Model transparency: is the decision mechanism readable, and is the explanation faithful to it?

- The linear head over the explanation, through the protocol (:meth:`~pellucid.models.InterpretableModel.
  explanation_head`): exact logit reconstruction from the explanation, and the head's sparsity.
- Deletion faithfulness: how fast the class probability falls as the most-evidenced voxels are deleted (Petsiuk et
  al., "RISE", BMVC 2018), against the least-evidenced-first reference curve (Samek et al., IEEE TNNLS 2017); the
  curves, with tied evidence deleted as one block, live in :mod:`pellucid.training.elements.faithfulness`.

Per-batch measurements; the aggregation over an epoch lives in :mod:`pellucid.training.elements.evaluator`.
"""

from __future__ import annotations

from torch import Tensor, nn

from pellucid.models import InterpretableModel, ModelOutput
from pellucid.models.explanation import LinearExplanationHead
from pellucid.training.elements.faithfulness import (  # re-exported: the deletion curves' old home
    DeletionBaseline,
    curve_area,
    deletion_curve,
    deletion_order,
)

__all__ = ["DeletionBaseline", "LinearExplanationHead", "curve_area", "deletion_curve", "deletion_order",
           "explanation_head", "head_sparsity", "logit_reconstruction"]

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


def head_sparsity(weight: Tensor, relative_tolerance: float = 1e-3) -> tuple[float, float]:
    """Share of negligible weights (|w| <= tol * max|w|) and the mean number of non-negligible weights per class."""
    magnitude = weight.detach().abs()
    peak = float(magnitude.max()) if magnitude.numel() else 0.0
    negligible = magnitude <= relative_tolerance * peak
    return float(negligible.float().mean()), float((~negligible).sum(dim=1).float().mean())
