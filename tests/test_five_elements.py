"""Five-element metrics: every element from ModelOutput alone, exact values on hand-made cases, the shortcut flag."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from explain_toys import (
    TOY_CONCEPTS,
    central_blob,
    fixed_evidence,
    single_threaded,  # noqa: F401 - a fixture, used through pytestmark
    toy_transparent,
)
from synthetic import RandomDataModule, make_batch
from torch import nn

from pellucid.models import ConceptSpec, InterpretableModel, ModelOutput, create_model
from pellucid.models.explanation import LinearExplanationHead
from pellucid.training import InterpretableModule
from pellucid.training.data import PhantomDataModule
from pellucid.training.elements.callback import ELEMENTS, METRICS, ExplanationEvaluator, FiveElementMetrics
from pellucid.training.elements.localization import dilate
from pellucid.training.elements.physical_attribution import concept_auroc
from pellucid.training.elements.transparency import head_sparsity, logit_reconstruction

pytestmark = pytest.mark.usefixtures("single_threaded")
def evaluate(model: InterpretableModel, batches: list[dict], **options) -> object:
    evaluator = ExplanationEvaluator(concept_specs=model.concept_specs,
                                     data_concept_specs=TOY_CONCEPTS, **options)
    model.eval()
    for batch in batches:
        with torch.no_grad():
            output = model(batch["image"], explain=True)
        evaluator.update(model, output, batch)
    return evaluator.compute()


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_model_with_every_field_gets_every_element_measured(spatial_dims: int) -> None:
    model = toy_transparent(spatial_dims)
    batches = [make_batch(spatial_dims, batch_size=4, seed=seed, concepts=TOY_CONCEPTS) for seed in range(2)]
    results = evaluate(model, batches, deletion_samples=4, deletion_fractions=(0.0, 0.5, 1.0))
    for name in ("pointing_game", "energy_inside_mask", "mask_dice", "mask_iou", "activation_precision",
                 "prototype_lesion_type_purity", "prototype_class_purity", "prototype_map_energy_inside_mask",
                 "concept_accuracy",
                 "concept_map_energy_inside_mask", "concept_mae/b", "head_sparsity", "head_terms_per_class",
                 "deletion_auc", "reverse_deletion_auc", "deletion_faithfulness", "intervention_gain"):
        assert results.value(name) is not None, name
    assert results.value("logit_reconstruction_exact") == 1.0  # the toy's logits are linear in its explanation
    assert results.value("logit_reconstruction_error") < 1e-5
    assert results.value("shortcut_share") is None
    assert any("confounder_mask" in note for note in results.notes["actionability"])
    assert {"deletion", "reverse_deletion", "intervention_uncertainty"} <= {c.name for c in results.curves}
    intervention = next(c for c in results.curves if c.name == "intervention_uncertainty")
    assert intervention.x == [0, 1, 2]
    assert {m.element for m in results.metrics} == set(ELEMENTS)
    assert results.samples == 8


def test_a_constant_evidence_map_points_at_nothing() -> None:
    batch, region = _bright_square_batch()
    model = fixed_evidence(region, "flat", shown=torch.zeros_like(region))
    results = evaluate(model, [batch], deletion_samples=0)
    assert results.value("constant_evidence_share") == 1.0
    assert results.value("pointing_game") is None  # not a hit everywhere: no sample counts
    assert results.value("energy_inside_mask") == 0.0


def test_shortcut_enrichment_is_one_for_a_uniform_map_and_zero_without_evidence_on_the_marker() -> None:
    batch, region = _bright_square_batch()
    batch["confounder_mask"] = torch.zeros(4, 1, 16, 16)
    batch["confounder_mask"][:, :, 12:14, 12:14] = 1.0
    for shown, expected in ((torch.full_like(region, 0.5), 1.0), (region, 0.0)):
        results = evaluate(fixed_evidence(region, "m", shown=shown), [batch], deletion_samples=0,
                           shortcut_tolerance=0)
        assert results.value("shortcut_enrichment") == pytest.approx(expected)
        assert results.value("shortcut_flagged") == 0.0


def test_the_black_box_head_is_linear_over_pooled_features_and_reconstructs_exactly() -> None:
    torch.manual_seed(0)
    model = create_model("blackbox", 2, in_channels=1, num_classes=3)
    results = evaluate(model, [make_batch(2, batch_size=3)], deletion_samples=0)
    assert results.value("logit_reconstruction_exact") == 1.0
    assert "linear head over: pooled_features" in results.notes["transparency"]
    assert results.value("head_sparsity") == 0.0  # a trained-from-scratch dense head
    assert results.value("prototype_purity") is None and results.value("concept_accuracy") is None
    assert results.notes["visual_recognizability"] == ["the model has no prototypes (prototype_similarity is None)"]


def test_reconstruction_fails_for_a_head_that_is_not_the_models() -> None:
    logits = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
    explanation = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    true_head = LinearExplanationHead("x", torch.tensor([[1.0, 0.5], [2.0, -1.0]]), None, lambda i, o: explanation)
    error, exact = logit_reconstruction(true_head, torch.zeros(2, 1, 4, 4), ModelOutput(logits=logits))
    assert exact.tolist() == [1.0, 1.0] and float(error.max()) == 0.0
    wrong_head = LinearExplanationHead("x", torch.tensor([[1.0, 0.5], [2.0, -0.9]]), None, lambda i, o: explanation)
    error, exact = logit_reconstruction(wrong_head, torch.zeros(2, 1, 4, 4), ModelOutput(logits=logits))
    assert exact.tolist() == [1.0, 0.0] and float(error[1]) == pytest.approx(0.1)


def test_head_sparsity_counts_negligible_weights() -> None:
    sparsity, terms = head_sparsity(torch.tensor([[1.0, 0.0, 1e-5], [0.0, 0.0, -0.5]]))
    assert sparsity == pytest.approx(4 / 6)
    assert terms == 1.0


def test_concept_accuracy_auroc_and_error_in_units_on_known_values() -> None:
    specs = [ConceptSpec("a", "binary"), ConceptSpec("b", "continuous", unit="mm")]
    evaluator = ExplanationEvaluator(concept_specs=specs, data_concept_specs=specs)
    concept_logits = torch.tensor([[2.0, 1.0], [-2.0, 2.0], [3.0, 3.0], [-1.0, 4.0]])
    concepts = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, math.nan], [math.nan, 6.0]])
    evaluator.update(nn.Identity(), ModelOutput(concept_logits=concept_logits),
                     {"image": torch.zeros(4, 1, 8, 8), "concepts": concepts})
    results = evaluator.compute()
    assert results.value("concept_accuracy") == pytest.approx(2 / 3)
    assert results.value("concept_auroc") == pytest.approx(0.5)  # positive 0.88 beats 0.12, loses to 0.95
    assert results.value("concept_mae/b") == pytest.approx(1.0)
    unit = next(m.unit for m in results.metrics if m.name == "concept_mae/b")
    assert unit == "mm"


def test_concept_auroc_matches_the_pairwise_definition() -> None:
    scores, targets = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.4]), torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0])
    pairs = [(p, n) for p in scores[targets == 1] for n in scores[targets == 0]]
    expected = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert concept_auroc(scores, targets) == pytest.approx(expected)
    assert concept_auroc(scores, torch.ones(5)) is None


def test_prototype_purity_on_known_neighbours() -> None:
    evaluator = ExplanationEvaluator(prototype_top_k=2)
    similarity = torch.tensor([[0.9, 0.8], [0.8, 0.1], [0.1, 0.7], [0.2, 0.2]])
    evaluator.update(nn.Identity(), ModelOutput(prototype_similarity=similarity),
                     {"image": torch.zeros(4, 1, 8, 8), "lesion_type": torch.tensor([1, 1, 2, 2]),
                      "label": torch.tensor([0, 1, 1, 1])})
    results = evaluator.compute()
    # prototype 0: samples 0, 1 (types 1, 1) -> 1.0; prototype 1: samples 0, 2 (types 1, 2) -> 0.5
    assert results.value("prototype_lesion_type_purity") == pytest.approx(0.75)
    # classes: prototype 0 -> (0, 1) 0.5; prototype 1 -> (0, 1) 0.5
    assert results.value("prototype_class_purity") == pytest.approx(0.5)


def _bright_square_batch() -> tuple[dict, torch.Tensor]:
    region = torch.zeros(16, 16)
    region[2:6, 2:6] = 1.0
    image = region.expand(4, 1, 16, 16).clone()
    return {"image": image, "label": torch.ones(4, dtype=torch.long), "mask": region.expand(4, 1, 16, 16)}, region


def test_deletion_faithfulness_separates_a_faithful_map_from_a_misleading_one() -> None:
    batch, region = _bright_square_batch()
    scores = {}
    for name, shown in (("faithful", region), ("misleading", 1.0 - region)):
        model = fixed_evidence(region, name, shown=shown)
        with torch.no_grad():
            model.head.weight.copy_(torch.tensor([[0.0], [10.0], [0.0]]))
            model.head.bias.copy_(torch.tensor([5.0, 0.0, 0.0]))
        scores[name] = evaluate(model, [batch]).value("deletion_faithfulness")
    assert scores["faithful"] > 0.3
    assert scores["misleading"] < 0.0


def _shortcut_phantom() -> PhantomDataModule:
    return PhantomDataModule(spatial_dims=2, seed=0, num_train=4, num_val=4, num_test=24, batch_size=8,
                             shortcut={"train": 1.0, "val": 1.0, "test": 1.0})


def _marker_map(data: PhantomDataModule) -> torch.Tensor:
    data.setup()
    for index in range(len(data.datasets["test"])):
        item = data.datasets["test"][index]
        if bool(item["shortcut_present"]):
            return dilate(item["confounder_mask"][None], 1)[0, 0]
    raise AssertionError("the shortcut phantom produced no marker")


def test_the_shortcut_phantom_flags_a_model_looking_at_the_marker_and_not_one_looking_at_the_lesion(tmp_path) -> None:
    data = _shortcut_phantom()
    marker = _marker_map(data)
    flags = {}
    for name, evidence in (("marker", marker), ("lesion", central_blob(tuple(marker.shape)))):
        callback = FiveElementMetrics(deletion_samples=0)
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, default_root_dir=tmp_path, callbacks=[callback])
        module = InterpretableModule(fixed_evidence(evidence, name), task="multiclass")
        logged = trainer.test(module, datamodule=data, verbose=False)[0]
        results = callback.results["test"]
        flags[name] = (results.value("shortcut_flagged"), results.value("shortcut_share"),
                       results.value("shortcut_enrichment"))
        assert logged["test/five/actionability/shortcut_flagged"] == results.value("shortcut_flagged")
    assert flags["marker"][0] == 1.0 and flags["marker"][1] > 0.5 and flags["marker"][2] > 10
    assert flags["lesion"][0] == 0.0 and flags["lesion"][1] < 0.05 and flags["lesion"][2] < 1


def test_the_callback_logs_every_measured_metric_during_validation(tmp_path) -> None:
    callback = FiveElementMetrics(deletion_samples=4, deletion_fractions=(0.0, 1.0))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tmp_path, max_epochs=1, limit_train_batches=2,
                         callbacks=[callback])
    module = InterpretableModule(toy_transparent(2), task="multiclass")
    trainer.fit(module, datamodule=RandomDataModule(spatial_dims=2, num_samples=8, batch_size=4))
    results = callback.results["val"]
    logged = {k for k in trainer.logged_metrics if k.startswith("val/five/")}
    assert logged == {f"val/five/{m.element}/{m.name}" for m in results.metrics if m.value is not None}
    assert "val/five/transparency/logit_reconstruction_exact" in logged
    assert "val/five/actionability/intervention_gain" in logged


def test_bad_options_name_the_option() -> None:
    with pytest.raises(ValueError, match=r"deletion_fractions must increase"):
        ExplanationEvaluator(deletion_fractions=(0.5, 0.2))
    with pytest.raises(ValueError, match=r"stages must be among"):
        FiveElementMetrics(stages=("train",))
    assert all(info.element in ELEMENTS for info in METRICS.values())
