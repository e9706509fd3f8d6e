"""Tiny models for the explanation tests: every ModelOutput field, or evidence placed on purpose."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from torch import Tensor, nn

from pellucid.models import ConceptSpec, InterpretableModel, ModelOutput
from pellucid.models.explanation import LinearExplanationHead
from pellucid.models.registry import ModelSpec

TOY_CONCEPTS = [ConceptSpec("a", "binary"), ConceptSpec("b", "continuous", unit="mm")]


def _with_spec(model: InterpretableModel, name: str) -> InterpretableModel:
    model.model_spec = ModelSpec(name=name, kwargs={"spatial_dims": model.spatial_dims})
    return model


class ToyTransparentModel(InterpretableModel):
    """Prototypes + concepts + one attention gate; logits linear in [prototype similarity, concept activations].

    Accepts concept interventions (``concept_mask``/``concept_values``) and exposes ``explanation_head()``.
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, num_classes: int = 3, num_prototypes: int = 4,
                 concepts: list[ConceptSpec] | None = None) -> None:
        super().__init__(spatial_dims, in_channels, num_classes)
        self.concept_specs = list(concepts or TOY_CONCEPTS)
        self.features = Conv[Conv.CONV, spatial_dims](in_channels, 8, kernel_size=3, stride=2, padding=1)
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, 8))
        self.concept_layer = Conv[Conv.CONV, spatial_dims](8, len(self.concept_specs), kernel_size=1)
        self.last_layer = nn.Linear(num_prototypes + len(self.concept_specs), num_classes)

    def _concept_activations(self, concept_logits: Tensor, concept_mask: Tensor | None,
                             concept_values: Tensor | None) -> Tensor:
        binary = torch.tensor([s.kind == "binary" for s in self.concept_specs], device=concept_logits.device)
        activations = torch.where(binary, concept_logits.sigmoid(), concept_logits)
        if concept_mask is not None:
            activations = torch.where(concept_mask, concept_values.to(activations.dtype), activations)
        return activations

    def forward(self, image: Tensor, *, explain: bool = True, concept_mask: Tensor | None = None,
                concept_values: Tensor | None = None) -> ModelOutput:
        self.check_input(image)
        features = F.relu(self.features(image))
        flat = features.flatten(2)  # (B, 8, V)
        distances = ((flat.unsqueeze(1) - self.prototypes[None, :, :, None]) ** 2).sum(2)  # (B, P, V)
        prototype_maps = torch.log1p(1.0 / (distances + 1e-4)).view(image.shape[0], -1, *features.shape[2:])
        similarity = prototype_maps.flatten(2).amax(dim=2)
        concept_maps = self.concept_layer(features)
        concept_logits = concept_maps.flatten(2).mean(dim=2)
        explanation = torch.cat([similarity, self._concept_activations(concept_logits, concept_mask,
                                                                       concept_values)], dim=1)
        logits = self.last_layer(explanation)
        output = ModelOutput(logits=logits, prototype_similarity=similarity, concept_logits=concept_logits)
        if explain:
            mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
            gate = torch.sigmoid(features.mean(dim=1, keepdim=True))
            evidence = F.interpolate(prototype_maps, size=image.shape[2:], mode=mode, align_corners=False)
            evidence = evidence.mean(dim=1, keepdim=True)
            low = evidence.flatten(1).amin(1).view(-1, *[1] * (evidence.ndim - 1))
            high = evidence.flatten(1).amax(1).view(-1, *[1] * (evidence.ndim - 1))
            localization = ((evidence - low) / (high - low).clamp_min(1e-8)).expand(-1, self.num_classes,
                                                                                   *image.shape[2:])
            output.localization = localization.clamp(0, 1)
            output.prototype_maps, output.concept_maps, output.attention = prototype_maps, concept_maps, (gate,)
        return output

    def explanation_head(self) -> LinearExplanationHead:
        def explanation(_image: Tensor, output: ModelOutput) -> Tensor:
            return torch.cat([output.prototype_similarity,
                              self._concept_activations(output.concept_logits, None, None)], dim=1)

        return LinearExplanationHead("prototype_similarity + concept activations", self.last_layer.weight,
                                     self.last_layer.bias, explanation)

    def prototype_provenance(self) -> list[dict]:
        return [{"sample_id": f"train-{p}", "class": p % self.num_classes} for p in range(len(self.prototypes))]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"backbone": list(self.features.parameters()) + list(self.concept_layer.parameters()),
                "prototypes": [self.prototypes], "head": list(self.last_layer.parameters())}

    def loss_terms(self, output: ModelOutput, batch: dict) -> dict[str, Tensor]:
        terms = super().loss_terms(output, batch)
        true = batch["concepts"][:, 0]
        terms["concept"] = F.binary_cross_entropy_with_logits(output.concept_logits[:, 0], true.float())
        return terms


def toy_transparent(spatial_dims: int = 2, **kwargs) -> ToyTransparentModel:
    torch.manual_seed(0)
    return _with_spec(ToyTransparentModel(spatial_dims, **kwargs), "toy_transparent")


class FixedEvidenceModel(InterpretableModel):
    """Classifies from the mean intensity under a fixed map, and shows that map as its evidence.

    With the map on the phantom's shortcut marker it is a model that learned the shortcut; with the map on the body
    centre it looks where lesions are.
    """

    def __init__(self, evidence: Tensor, num_classes: int = 3, shown: Tensor | None = None) -> None:
        super().__init__(evidence.ndim, 1, num_classes)
        self.register_buffer("evidence", evidence.float().clamp(0, 1))
        self.register_buffer("shown", (evidence if shown is None else shown).float().clamp(0, 1))
        self.head = nn.Linear(1, num_classes)

    def forward(self, image: Tensor, *, explain: bool = True) -> ModelOutput:
        self.check_input(image)
        weights = self.evidence / self.evidence.sum()
        logits = self.head((image[:, 0] * weights).flatten(1).sum(1, keepdim=True))
        localization = self.shown.expand(image.shape[0], self.num_classes, *image.shape[2:]) if explain else None
        return ModelOutput(logits=logits, localization=localization)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"head": list(self.head.parameters())}


def fixed_evidence(evidence: Tensor, name: str, shown: Tensor | None = None) -> FixedEvidenceModel:
    """A :class:`FixedEvidenceModel` reading ``evidence`` and showing ``shown`` (default: what it reads)."""
    torch.manual_seed(0)
    return _with_spec(FixedEvidenceModel(evidence, shown=shown), name)


def central_blob(size: tuple[int, ...], sigma: float = 0.15) -> Tensor:
    """A Gaussian bump at the image centre (where the phantom body and its lesions are)."""
    axes = torch.meshgrid(*[torch.linspace(-0.5, 0.5, n) for n in size], indexing="ij")
    return torch.exp(-sum(a**2 for a in axes) / (2 * sigma**2))


@pytest.fixture
def single_threaded() -> Iterator[None]:
    """One intra-op thread while a test runs: on a shared, busy 2-core machine, two spinning threads per process
    make small convolutions (and Grad-CAM's backward passes) up to 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
