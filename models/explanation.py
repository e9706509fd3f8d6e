"""What the explanation protocol returns: a model's decision as a linear head over its explanation.

The protocol itself is a handful of optional methods on :class:`~pellucid.models.base.InterpretableModel`
(``explanation_head``, ``prototype_classes``, ``prototype_provenance``, ``accepts_interventions``, and the
``concept_specs`` and ``localization_interpolation`` attributes); each family implements those that apply to it, and
the evaluation in ``pellucid.training`` calls only them. This module holds the value types they return, so that both
``models/`` and ``training/`` can import them without a cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from pellucid.models.output import ModelOutput


@dataclass(frozen=True)
class LinearExplanationHead:
    """A model's decision as a linear function of its explanation: ``logits = explanation @ weight.T + bias``.

    The five-element evaluation checks the claim (exact logit reconstruction, in eval mode) and measures the head
    (sparsity, terms per class).

    Args:
        source: What the explanation vector is (``"prototype_similarity"``, ``"concept values in their units"``,
            ``"pooled_features"`` ...), shown in reports.
        weight: (K, D) weights, one row per class.
        bias: (K,) bias, or ``None``.
        explanation: ``(image, output) -> (B, D)``: the explanation vector the head reads. It may reuse fields of
            ``output`` (no extra forward pass) or recompute features from ``image``.
        names: Optional names of the ``D`` explanation entries (prototype or concept names).
    """

    source: str
    weight: Tensor
    bias: Tensor | None
    explanation: Callable[[Tensor, ModelOutput], Tensor]
    names: list[str] | None = None

    def logits(self, image: Tensor, output: ModelOutput) -> Tensor:
        """(B, K) logits rebuilt from the explanation of ``output`` (``image`` is what the model was given).

        Raises:
            ValueError: when the weight does not fit the explanation's width.
        """
        explanation = self.explanation(image, output).flatten(1).to(self.weight.dtype)
        if self.weight.ndim != 2 or self.weight.shape[1] != explanation.shape[1]:
            raise ValueError(f"explanation head ({self.source}): weight shape {tuple(self.weight.shape)} does not fit "
                             f"{explanation.shape[1]} explanation entries; expected (K, {explanation.shape[1]})")
        rebuilt = explanation @ self.weight.T
        return rebuilt + self.bias if self.bias is not None else rebuilt


__all__ = ["LinearExplanationHead"]
