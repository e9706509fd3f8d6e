"""The base class of every pellucid model: input checks, parameter groups, loss terms.

A model is a plain ``nn.Module`` (no Lightning). The training module only relies on what is defined
here: ``forward(image, explain=...) -> ModelOutput``, ``parameter_groups()`` and ``loss_terms()``.

The *explanation protocol* is here too: a few optional, typed methods and attributes with defaults that mean "not
this kind of model" (``explanation_head``, ``prototype_classes``, ``prototype_provenance``, ``accepts_interventions``,
``concept_specs``, ``localization_interpolation``, ``record_prototype_sources``, ``abstentions``,
``logit_contributions``). Each family
implements those that apply to it; the evaluation, the writer and the report call only these, never a family's
attribute names. A model that keeps a default simply gets no such metric.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pellucid.models.concepts import ConceptSpec
from pellucid.models.explanation import LinearExplanationHead
from pellucid.models.output import ModelOutput
from pellucid.models.recipe import Recipe


class InputError(ValueError):
    """The image given to a model does not match what the model was built for."""


def classification_loss(logits: Tensor, label: Tensor) -> Tensor:
    """Cross-entropy for class indices, binary cross-entropy for multi-label 0/1 targets.

    The task is read from the label itself (batch convention): ``(B,)`` integer labels are multi-class,
    ``(B, K)`` float labels are multi-label.
    """
    if label.ndim == 1:
        return F.cross_entropy(logits, label.long())
    if label.shape != logits.shape:
        raise InputError(f"multi-label target: expected shape {tuple(logits.shape)}, got {tuple(label.shape)}")
    return F.binary_cross_entropy_with_logits(logits, label.to(logits.dtype))


class InterpretableModel(nn.Module):
    """Common seams of every architecture in the zoo.

    Subclasses implement :meth:`forward` (returning :class:`ModelOutput`), :meth:`parameter_groups`
    and, when they add terms beyond classification, :meth:`loss_terms`. The explanation protocol (every part
    optional) is :meth:`explanation_head`, :meth:`prototype_classes`, :meth:`prototype_provenance`,
    :meth:`accepts_interventions` and the two attributes below.

    Args:
        spatial_dims: 2 or 3.
        in_channels: Image channels the model accepts.
        num_classes: Number of classes ``K``.

    Attributes:
        concept_specs: The concepts the model predicts, in ``concept_logits`` column order; ``None`` (the default)
            for a model that predicts no concepts. Concept models override it (a property or an attribute).
        localization_interpolation: How the model upsamples feature-resolution evidence to ``localization``
            (``"linear"`` or ``"cubic"``); metrics that upsample the model's own maps (e.g. prototype maps) do the
            same.
    """

    concept_specs: list[ConceptSpec] | None = None
    localization_interpolation: str = "linear"

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.num_classes = num_classes

    @property
    def name(self) -> str:
        """Registry name when built by ``create_model``, else the class name."""
        spec = getattr(self, "model_spec", None)
        return spec.name if spec is not None else type(self).__name__

    def check_input(self, image: Tensor) -> None:
        """Raise :class:`InputError` naming expected and actual when ``image`` does not fit the model."""
        expected_rank = self.spatial_dims + 2
        layout = "(B, C, H, W)" if self.spatial_dims == 2 else "(B, C, D, H, W)"
        if not isinstance(image, Tensor):
            raise InputError(f"{self.name}: expected a torch.Tensor image, got {type(image).__name__}")
        if image.ndim != expected_rank:
            hint = " (a 2D image given to a 3D model?)" if image.ndim == expected_rank - 1 else ""
            hint = hint or (" (a 3D volume given to a 2D model?)" if image.ndim == expected_rank + 1 else "")
            raise InputError(
                f"{self.name} (spatial_dims={self.spatial_dims}): expected a {expected_rank}-D image {layout}, "
                f"got shape {tuple(image.shape)}{hint}"
            )
        if image.shape[1] != self.in_channels:
            raise InputError(
                f"{self.name}: expected {self.in_channels} input channel(s) on axis 1, got {image.shape[1]} "
                f"(image shape {tuple(image.shape)})"
            )
        if not image.is_floating_point():
            raise InputError(f"{self.name}: expected a floating-point image, got dtype {image.dtype}")
        # one pass, one read: a NaN or infinity anywhere makes the sum non-finite; the exact count runs only then
        # (and tells an overflowing sum of finite values apart)
        if not torch.isfinite(image.sum()) and not bool(torch.isfinite(image).all()):
            bad = int((~torch.isfinite(image)).sum())
            raise InputError(
                f"{self.name}: expected finite pixel values, got {bad} NaN or infinite value(s) "
                f"in image of shape {tuple(image.shape)}"
            )

    def forward(self, image: Tensor, *, explain: bool = True) -> ModelOutput:  # pragma: no cover - abstract
        """Predict and explain.

        Args:
            image: (B, C, *S) float tensor.
            explain: When False, skip explanation work that neither the prediction nor the loss needs
                (e.g. Grad-CAM passes, upsampling maps to input size). Training steps pass False.
        """
        raise NotImplementedError

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named, disjoint groups covering every parameter (e.g. ``backbone``, ``head``).

        The training module gives each group its own learning rate; the phase schedule freezes and
        unfreezes groups by name.
        """
        raise NotImplementedError

    def loss_terms(self, output: ModelOutput, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Named, unweighted loss terms for one batch; the training module weights, sums and logs them."""
        if output.logits is None:
            raise NotImplementedError(f"{self.name} makes no logits; it must define its own loss_terms")
        return {"classification": classification_loss(output.logits, batch["label"])}

    # ------------------------------------------------------------------ explanation protocol (all optional)
    def explanation_head(self) -> LinearExplanationHead | None:
        """The linear head through which the logits are computed from the explanation, if the model has one.

        Returns:
            A :class:`~pellucid.models.explanation.LinearExplanationHead` whose ``explanation(image, output)``
            gives the vector the head reads, so that in eval mode ``head.logits(image, output)`` equals
            ``output.logits`` (the evaluation checks it); ``None`` (the default) when the logits are not linear in
            an explanation the model exposes, or the model makes no logits.
        """
        return None

    def logit_contributions(self, output: ModelOutput) -> Tensor | None:
        """(B, K, *S) contribution of each input location to each logit of ``output``, if the model exposes them.

        Returns:
            Contributions whose sum over the spatial axes equals ``output.logits`` (a dynamic-linear model such as
            B-cos: ``logits = W(x) x``), read from ``output`` (e.g. its ``aux``); ``None`` (the default) when the
            logits are not such a sum or ``output`` was not explained. The evaluation checks the sum.
        """
        return None

    def prototype_classes(self) -> Tensor | None:
        """(P,) class index of each prototype, in ``prototype_similarity`` column order.

        Returns:
            ``None`` (the default) for a model without class-specific prototypes; then no prototype metric that
            needs a prototype's class (k-NN class purity, activation precision, consistency, stability) is computed.
        """
        return None

    def active_prototypes(self) -> Tensor | None:
        """(P,) bool, which prototypes still count (pruning switches some off), in ``prototype_similarity`` order.

        Returns:
            ``None`` (the default) for a model without prototypes or without pruning: every prototype counts.
        """
        return None

    def prototype_provenance(self) -> list[dict[str, Any] | None] | None:
        """Where each prototype came from, as plain JSON-serialisable values (the writer saves it).

        Returns:
            One entry per prototype (``None`` for a prototype not yet projected onto a training patch), or ``None``
            (the default) for a model without prototypes.
        """
        return None

    def accepts_interventions(self) -> bool:
        """Whether ``forward`` takes concept interventions (``concept_mask`` and ``concept_values`` arguments).

        The default reads ``forward``'s own signature (the documented intervention arguments); override it to say
        otherwise. A model that accepts them must also set :attr:`concept_specs`.
        """
        parameters = inspect.signature(self.forward).parameters
        return "concept_mask" in parameters and "concept_values" in parameters

    def record_prototype_sources(self, provenance: list[dict[str, Any] | None]) -> None:
        """Keep the training patch where each prototype is most present, found after training; prototypes unchanged.

        For models whose prototypes are not latent vectors that push could replace (PIP-Net: a prototype is a channel
        of its presence maps), the push callback finds each prototype's source in the training data
        (:func:`pellucid.training.prototypes.push.find_prototype_sources`) and hands it here, one plain-value entry
        (or ``None``) per prototype; :meth:`prototype_provenance` then returns them. The default refuses: the model
        keeps no prototype sources.
        """
        raise NotImplementedError(f"{self.name} keeps no prototype sources (record_prototype_sources is not "
                                  "implemented)")

    def abstentions(self, output: ModelOutput) -> Tensor | None:
        """(B,) bool: where the model declined to decide (e.g. PIP-Net when no prototype is present).

        Returns:
            ``None`` (the default) for a model that never abstains; the report card counts the share abstained.
        """
        return None

    def calibrate_abstention(self, logits: Tensor) -> None:
        """Set the model's abstention thresholds from its (N, K) eval-mode logits on the training data.

        Called after training by the same pass that finds prototype sources (:meth:`record_prototype_sources`); the
        default has nothing to calibrate.
        """

    def forget_training_data(self) -> list[str]:
        """Forget state that describes the data the weights were trained on (e.g. prototype provenance, pruning).

        Called when a fine-tune starts from other weights (``--init_from``). Returns one line per thing forgotten;
        the default has nothing to forget.
        """
        return []

    def default_recipe(self) -> Recipe | None:
        """The family's training method (phases, push, pruning, loss weights), applied to any data by the trainer.

        ``None`` (the default): every parameter group trains throughout with the module's settings.
        See :mod:`pellucid.models.recipe`.
        """
        return None


def check_parameter_groups(model: InterpretableModel) -> dict[str, list[nn.Parameter]]:
    """Return the model's parameter groups after checking they are disjoint and cover every parameter.

    Raises:
        ValueError: naming the group and parameter at fault.
    """
    groups = model.parameter_groups()
    owner: dict[int, str] = {}
    for group, params in groups.items():
        for param in params:
            if id(param) in owner:
                raise ValueError(f"{model.name}: a parameter is in both groups {owner[id(param)]!r} and {group!r}")
            owner[id(param)] = group
    missing = [name for name, param in model.named_parameters() if id(param) not in owner]
    if missing:
        raise ValueError(f"{model.name}: parameters in no group: {', '.join(missing[:5])}")
    return groups
