"""The explanation protocol of InterpretableModel, over every registered model in 2D and 3D.

Each protocol method either says "not this kind of model" (its default) or returns something consistent with the
model's own output: the linear head rebuilds the logits, there is one prototype class and one provenance entry per
prototype, one concept specification per concept column. The evaluation relies on exactly these promises.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from synthetic import make_batch

import pellucid.models.registry as registry_module
from pellucid.models import ConceptSpec, InterpretableModel, ModelOutput, create_model, list_models, register_model
from pellucid.models.concept_bottleneck import ConceptBottleneck
from pellucid.models.concept_layers import DEFAULT_CONCEPTS, builder_takes_concepts, takes_concepts
from pellucid.models.explanation import LinearExplanationHead
from pellucid.training import InterpretableModule
from pellucid.training.elements.transparency import explanation_head, logit_reconstruction

NUM_CLASSES = 3
CASES = [(name, dims) for name in list_models() for dims in (2, 3)]
# the zoo's classifiers: each declares a linear head over its explanation (attention_unet is a segmenter: none)
ZOO_HEADS = {"blackbox": "pooled_features", "blackbox_resnet10": "pooled_features", "protopnet": "prototype_similarity",
             "protopnet_cosine": "prototype_similarity", "xprotonet": "prototype_similarity",
             "cbm": "concept values in their units", "cbm_spatial": "concept values in their units",
             "cem": "mixed concept embeddings", "attention_classifier": "attention-pooled path vectors"}
SPECS = [ConceptSpec("spiculated", "binary"), ConceptSpec("size_mm", "continuous", unit="mm"),
         ConceptSpec("calcified", "binary")]


def build(name: str, spatial_dims: int) -> InterpretableModel:
    torch.manual_seed(0)
    return create_model(name, spatial_dims, in_channels=1, num_classes=NUM_CLASSES).eval()


def explained(model: InterpretableModel, spatial_dims: int) -> tuple[torch.Tensor, ModelOutput]:
    image = make_batch(spatial_dims, batch_size=2)["image"]
    with torch.no_grad():
        return image, model(image, explain=False)


@pytest.mark.parametrize(("name", "spatial_dims"), CASES)
def test_the_linear_head_rebuilds_the_logits(name: str, spatial_dims: int) -> None:
    model = build(name, spatial_dims)
    image, output = explained(model, spatial_dims)
    head = model.explanation_head()
    if name in ZOO_HEADS:
        assert head is not None and head.source == ZOO_HEADS[name]
    if head is None:
        assert name not in ZOO_HEADS
        return
    assert output.logits is not None, f"{name} declares a head but makes no logits"
    with torch.no_grad():
        rebuilt = head.logits(image, output)
        error, exact = logit_reconstruction(head, image, output)
    torch.testing.assert_close(rebuilt, output.logits, atol=1e-5, rtol=1e-5)
    assert exact.tolist() == [1.0, 1.0] and float(error.max()) < 1e-5
    assert head.weight.shape[0] == NUM_CLASSES and (head.bias is None or head.bias.shape == (NUM_CLASSES,))
    if head.names is not None:
        assert len(head.names) == head.weight.shape[1] == len(set(head.names))
    assert explanation_head(model).source == head.source  # what the evaluation calls


@pytest.mark.parametrize(("name", "spatial_dims"), CASES)
def test_prototype_classes_and_provenance_have_one_entry_per_prototype(name: str, spatial_dims: int) -> None:
    model = build(name, spatial_dims)
    _, output = explained(model, spatial_dims)
    classes, provenance = model.prototype_classes(), model.prototype_provenance()
    if classes is None:
        assert provenance is None and name not in ("protopnet", "protopnet_cosine", "xprotonet")
        return
    count = output.prototype_similarity.shape[1]
    assert classes.shape == (count,) and classes.dtype == torch.long
    assert int(classes.min()) >= 0 and int(classes.max()) < NUM_CLASSES
    assert sorted(set(classes.tolist())) == list(range(NUM_CLASSES))  # every class has its prototypes
    assert provenance is not None and len(provenance) == count
    assert provenance == [None] * count  # nothing pushed yet


@pytest.mark.parametrize(("name", "spatial_dims"), CASES)
def test_concepts_and_interventions_match_the_concept_columns(name: str, spatial_dims: int) -> None:
    model = build(name, spatial_dims)
    image, output = explained(model, spatial_dims)
    assert model.localization_interpolation in ("linear", "cubic")
    specs = model.concept_specs
    if specs is None:
        assert output.concept_logits is None and not model.accepts_interventions()
        return
    assert output.concept_logits is not None and output.concept_logits.shape[1] == len(specs)
    assert all(isinstance(spec, ConceptSpec) for spec in specs)
    if model.accepts_interventions():
        values = torch.zeros_like(output.concept_logits)
        with torch.no_grad():
            untouched = model(image, explain=False, concept_mask=torch.zeros_like(values, dtype=torch.bool),
                              concept_values=values)
            set_all = model(image, explain=False, concept_mask=torch.ones_like(values, dtype=torch.bool),
                            concept_values=values)
        torch.testing.assert_close(untouched.logits, output.logits)
        assert not torch.allclose(set_all.logits, output.logits)


def test_a_plain_model_keeps_every_default_and_gets_no_family_metric() -> None:
    class Plain(InterpretableModel):
        def forward(self, image: torch.Tensor, *, explain: bool = True) -> ModelOutput:
            return ModelOutput(logits=image.flatten(1)[:, :2])

    model = Plain(2, 1, 2)
    assert model.explanation_head() is None and model.prototype_classes() is None
    assert model.prototype_provenance() is None and model.concept_specs is None
    assert not model.accepts_interventions() and model.localization_interpolation == "linear"
    assert explanation_head(torch.nn.Identity()) is None  # not an InterpretableModel: no protocol, no metric


def test_a_head_that_does_not_fit_the_explanation_names_the_shapes() -> None:
    head = LinearExplanationHead("x", torch.zeros(3, 4), None, lambda _image, _output: torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"weight shape \(3, 4\) does not fit 5 explanation entries"):
        head.logits(torch.zeros(2, 1, 4, 4), ModelOutput(logits=torch.zeros(2, 3)))


@pytest.fixture
def own_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Models registered by a test disappear after it."""
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))


def test_a_declared_builder_taking_kwargs_receives_the_data_concepts(own_registry: None) -> None:
    @register_model
    @takes_concepts
    def kwargs_cbm(spatial_dims: int, **kwargs: Any) -> ConceptBottleneck:
        return ConceptBottleneck(spatial_dims, **{"backbone_kwargs": {"channels": (4, 8), "strides": (2, 2)},
                                                  **kwargs})

    @register_model
    def undeclared_cbm(spatial_dims: int, **kwargs: Any) -> ConceptBottleneck:
        return ConceptBottleneck(spatial_dims, **{"backbone_kwargs": {"channels": (4, 8), "strides": (2, 2)},
                                                  **kwargs})

    assert builder_takes_concepts(kwargs_cbm) and not builder_takes_concepts(undeclared_cbm)
    module = InterpretableModule("kwargs_cbm", spatial_dims=2, in_channels=1, num_classes=2, concepts=SPECS)
    assert module.model.concept_specs == SPECS
    assert module.hparams["concepts"] == [spec.to_dict() for spec in SPECS]
    undeclared = InterpretableModule("undeclared_cbm", spatial_dims=2, in_channels=1, num_classes=2, concepts=SPECS)
    assert undeclared.model.concept_specs == list(DEFAULT_CONCEPTS)  # it did not say it takes them


@pytest.mark.parametrize("name", ["cbm", "cbm_spatial", "cem", "protopnet", "protopnet_cosine"])
def test_the_zoo_builders_that_take_concepts_declare_it(name: str) -> None:
    assert builder_takes_concepts(registry_module.model_builder(name))
