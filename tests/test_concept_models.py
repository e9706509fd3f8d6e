"""Concept models (cbm, cbm_spatial, cem): specs in checkpoints, units, losses, interventions, training modes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from synthetic import RandomDataModule, make_batch
from test_module import trainer
from test_phases import Record

from pellucid.models import ConceptSpec, InputError, ModelOutput, create_model
from pellucid.models.concept_layers import DEFAULT_CONCEPTS, ConceptBank
from pellucid.training import InterpretableModule, Phase, PhaseSchedule

SPECS = [
    ConceptSpec("size_mm", "continuous", "mm", "size"),
    ConceptSpec("spiky", "binary", None, "margin"),
    ConceptSpec("bright", "binary", None, "intensity"),
]
SMALL = {"backbone_kwargs": {"channels": [8, 16], "strides": [2, 2]}}


def build(name: str = "cbm", spatial_dims: int = 2, concepts=SPECS, **kwargs):
    torch.manual_seed(0)
    return create_model(name, spatial_dims, in_channels=1, num_classes=3, concepts=concepts, **{**SMALL, **kwargs})


def fill_statistics(model, seed: int = 0) -> dict:
    """Run a training-mode loss on a batch so the normalisation statistics hold real values."""
    batch = make_batch(2, batch_size=8, concepts=model.concept_specs, seed=seed)
    model.train()
    model.loss_terms(model(batch["image"], explain=False), batch)
    return batch


@pytest.mark.parametrize("name", ["cbm", "cbm_spatial", "cem"])
def test_concept_specs_and_statistics_travel_in_the_state_dict(name: str) -> None:
    model = build(name)
    fill_statistics(model)
    assert float(model.concept_bank.count[0]) == 8 and float(model.concept_bank.std[0]) != 1.0
    restored = build(name)
    restored.load_state_dict(model.state_dict())
    assert restored.concept_specs == SPECS
    torch.testing.assert_close(restored.concept_bank.mean, model.concept_bank.mean)
    image = make_batch(2)["image"]
    model.eval(), restored.eval()
    torch.testing.assert_close(restored(image).concept_logits, model(image).concept_logits)
    renamed = build(name, concepts=[ConceptSpec("other_mm", "continuous", "mm"), *SPECS[1:]])
    with pytest.raises(ValueError, match=r"concept specifications in the state_dict \(\['size_mm'.*differ.*'other_mm'"):
        renamed.load_state_dict(model.state_dict())


def test_checkpoint_rebuilds_the_concept_model_with_the_data_concepts(tmp_path) -> None:
    data = RandomDataModule(spatial_dims=2)
    module = InterpretableModule("cbm", spatial_dims=2, in_channels=1, num_classes=3, concepts=data.concept_specs,
                                 model_kwargs=SMALL)
    run = trainer(tmp_path, max_steps=2)
    run.fit(module, datamodule=data)
    run.save_checkpoint(tmp_path / "cbm.ckpt")
    restored = InterpretableModule.load_from_checkpoint(tmp_path / "cbm.ckpt")
    assert restored.model.concept_specs == data.concept_specs != list(DEFAULT_CONCEPTS)
    torch.testing.assert_close(restored.model.concept_bank.mean, module.model.concept_bank.mean)
    image = make_batch(2)["image"]
    module.eval(), restored.eval()
    torch.testing.assert_close(restored(image).logits, module(image).logits)


def test_default_concepts_when_none_are_given() -> None:
    model = create_model("cbm", 2, in_channels=1, num_classes=3)
    assert model.concept_specs == list(DEFAULT_CONCEPTS)
    with pytest.raises(ValueError, match=r"names must be unique, got \['a'\]"):
        create_model("cbm", 2, concepts=[ConceptSpec("a", "binary"), ConceptSpec("a", "binary")])


def test_statistics_skip_nan_and_freeze_after_max_count() -> None:
    bank = ConceptBank(SPECS, max_count=6)
    first = torch.tensor([[2.0, 1.0, 0.0], [4.0, 0.0, float("nan")], [float("nan"), 1.0, 1.0], [6.0, 1.0, 0.0]])
    bank.update(first)
    torch.testing.assert_close(bank.mean, torch.tensor([4.0, 0.75, 1 / 3]))
    torch.testing.assert_close(bank.std[0], torch.tensor(8 / 3).sqrt())
    bank.update(torch.tensor([[10.0, 1.0, 1.0]] * 4))
    assert bank.count.tolist() == [7.0, 8.0, 7.0]
    frozen = bank.mean.clone()
    bank.update(torch.tensor([[100.0, 0.0, 0.0]] * 4))
    torch.testing.assert_close(bank.mean, frozen)


def test_concept_loss_masks_nan_and_balances_binary_classes() -> None:
    bank = ConceptBank(SPECS)
    bank.update(torch.tensor([[0.0, 1.0, 0.0], [10.0, 0.0, 0.0], [20.0, 0.0, 0.0], [30.0, 0.0, 1.0]]))
    raw = torch.zeros(4, 3, requires_grad=True)
    targets = torch.tensor([[0.0, 1.0, float("nan")], [float("nan"), 0.0, float("nan")],
                            [20.0, 0.0, float("nan")], [30.0, 0.0, float("nan")]])
    loss = bank.loss(raw, targets, balanced=True)
    loss.backward()
    assert raw.grad[:, 2].abs().sum() == 0 and raw.grad[1, 0] == 0  # unannotated entries get no gradient
    z = (torch.tensor([0.0, 20.0, 30.0]) - bank.mean[0]) / bank.std[0]
    # spiky: 1 positive of 4 seen -> positives weigh 0.5/0.25 = 2, negatives 0.5/0.75; BCE at logit 0 is log 2.
    expected = ((z**2).mean() + torch.log(torch.tensor(2.0))) / 2
    torch.testing.assert_close(loss, expected)
    assert float(bank.loss(raw, torch.full((4, 3), float("nan"))).detach()) == 0.0


@pytest.mark.parametrize("name", ["cbm", "cbm_spatial", "cem"])
def test_interventions_set_concepts_in_their_units(name: str) -> None:
    model = build(name)
    fill_statistics(model)
    model.eval()
    image = make_batch(2, batch_size=3)["image"]
    plain = model(image)
    mask = torch.tensor([[True, False, True]] * 3)
    values = torch.tensor([[12.5, float("nan"), 1.0]] * 3)
    corrected = model(image, concept_mask=mask, concept_values=values)
    assert torch.equal(corrected.concept_logits[:, 0], torch.full((3,), 12.5))
    assert bool((corrected.concept_logits[:, 2] > 10).all())  # logit of "present"
    torch.testing.assert_close(corrected.concept_logits[:, 1], plain.concept_logits[:, 1])
    assert not torch.allclose(corrected.logits, plain.logits)


def test_cbm_label_depends_only_on_the_concepts_once_all_are_set() -> None:
    model = build("cbm")
    fill_statistics(model)
    model.eval()
    values = torch.tensor([[12.5, 0.0, 1.0], [3.0, 1.0, 0.0]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    first = model(make_batch(2, seed=1)["image"], concept_mask=mask, concept_values=values).logits
    second = model(make_batch(2, seed=2)["image"], concept_mask=mask, concept_values=values).logits
    torch.testing.assert_close(first, second)
    weights, bias = model.label_head.unit_weights(model.concept_bank)  # the exported head, per unit
    torch.testing.assert_close(first, values @ weights.T + bias)


def test_head_table_reads_per_unit() -> None:
    model = build("cbm")
    fill_statistics(model)
    text = model.describe_head(["normal", "benign", "malignant"])
    lines = text.splitlines()
    assert [line.split(":")[0] for line in lines] == ["normal", "benign", "malignant"]
    assert all("per mm size_mm" in line and "spiky" in line and "bias" in line for line in lines)
    rows = model.label_head.table(model.concept_bank, ["normal", "benign", "malignant"])
    assert len(rows) == 3 * 4 and {r["per"] for r in rows} == {"mm", "present", ""}


def test_bad_interventions_name_the_argument() -> None:
    model = build("cbm").eval()
    image = make_batch(2)["image"]
    mask, values = torch.ones(2, 3, dtype=torch.bool), torch.tensor([[5.0, 1.0, 0.0]] * 2)
    with pytest.raises(InputError, match="got concept_mask without concept_values"):
        model(image, concept_mask=mask)
    with pytest.raises(InputError, match=r"concept_values: expected a tensor of shape \(2, 3\).*got torch.Size"):
        model(image, concept_mask=mask, concept_values=values[:, :2])
    with pytest.raises(InputError, match="concept_mask: expected dtype torch.bool, got torch.float32"):
        model(image, concept_mask=mask.float(), concept_values=values)
    with pytest.raises(InputError, match="finite values wherever concept_mask is True"):
        model(image, concept_mask=mask, concept_values=torch.full((2, 3), float("nan")))
    with pytest.raises(InputError, match=r"binary concepts take a value in \[0, 1\].*got range \[0, 3\]"):
        model(image, concept_mask=mask, concept_values=torch.tensor([[5.0, 3.0, 0.0]] * 2))


def test_loss_terms_require_matching_concepts() -> None:
    model = build("cbm")
    batch = make_batch(2, concepts=SPECS)
    output = model(batch["image"], explain=False)
    with pytest.raises(KeyError, match="the batch needs 'concepts'"):
        model.loss_terms(output, {k: v for k, v in batch.items() if k != "concepts"})
    with pytest.raises(ValueError, match=r"batch\['concepts'\]: expected shape \(2, 3\).*got \(2, 2\)"):
        model.loss_terms(output, {**batch, "concepts": batch["concepts"][:, :2]})


def test_task_from_true_concepts_ignores_the_encoder() -> None:
    model = build("cbm", normalizer_samples=1)  # statistics frozen after the first batch
    batch = fill_statistics(model)
    before = model.loss_terms(model(batch["image"], explain=False), batch)
    with torch.no_grad():
        model.concept_evidence.weight.mul_(-3.0)
    after = model.loss_terms(model(batch["image"], explain=False), batch)
    torch.testing.assert_close(after["task_from_true_concepts"], before["task_from_true_concepts"])
    assert not torch.allclose(after["concept"], before["concept"])
    assert set(after) == {"classification", "concept", "task_from_true_concepts"}
    assert "label_head_l1" in build("cbm", sparse_head=True).loss_terms(model(batch["image"]), batch)


def test_spatial_concept_maps_are_attention_over_locations() -> None:
    model = build("cbm_spatial", spatial_dims=3).eval()
    image = make_batch(3, batch_size=2)["image"]
    output = model(image)
    assert output.concept_maps.shape == (2, 3, 4, 4, 4) and output.localization.shape == (2, 3, 16, 16, 16)
    torch.testing.assert_close(output.concept_maps.flatten(2).sum(2), torch.ones(2, 3))
    plain = build("cbm").eval()(image[:, :, 0]).concept_maps  # the plain cbm's maps are its signed evidence
    assert plain.shape == (2, 3, 4, 4) and bool((plain < 0).any())


def test_cem_random_interventions_only_while_training() -> None:
    always = build("cem", intervention_probability=1.0, normalizer_samples=1)  # statistics frozen after one batch
    never = build("cem", intervention_probability=0.0)
    batch = fill_statistics(always)
    never.load_state_dict(always.state_dict())
    always.eval(), never.eval()
    torch.testing.assert_close(always(batch["image"]).logits, never(batch["image"]).logits)
    torch.testing.assert_close(always.loss_terms(always(batch["image"]), batch)["classification"],
                               F.cross_entropy(always(batch["image"]).logits, batch["label"]))
    always.train()
    output = always(batch["image"], explain=False)
    terms = always.loss_terms(output, batch)
    # Recompute with every concept set to its true value (training mode: the same batch statistics).
    corrected = always(batch["image"], explain=False, concept_mask=torch.ones(8, 3, dtype=torch.bool),
                       concept_values=batch["concepts"])
    torch.testing.assert_close(terms["classification"], F.cross_entropy(corrected.logits, batch["label"]))
    assert not torch.allclose(terms["classification"], F.cross_entropy(output.logits, batch["label"]))


def test_cem_output_detaches_its_embeddings() -> None:
    model = build("cem").train()
    output = model(make_batch(2)["image"], explain=False)
    assert type(output) is ModelOutput and output.aux["positive_embeddings"].requires_grad
    assert output.aux["negative_embeddings"].shape == (2, 3, model.embedding_size)
    detached = output.detach()
    assert not detached.aux["positive_embeddings"].requires_grad and not detached.logits.requires_grad
    with pytest.raises(TypeError, match=r"expected aux\['positive_embeddings'\]"):
        model.loss_terms(build("cbm")(make_batch(2)["image"]), make_batch(2, concepts=SPECS))


@pytest.mark.parametrize("mode", ["sequential", "independent"])
def test_sequential_and_independent_modes_train_one_group_per_phase(tmp_path, mode: str) -> None:
    label_term = "classification" if mode == "sequential" else "task_from_true_concepts"
    off = {"classification": 0.0, "concept": 0.0, "task_from_true_concepts": 0.0}
    schedule = PhaseSchedule([
        Phase("concepts", 1, train=["concept_encoder"], loss_weights={**off, "concept": 1.0}),
        Phase("label_head", 1, train=["label_head"], loss_weights={**off, label_term: 1.0}),
    ])
    record = Record()
    data = RandomDataModule(spatial_dims=2)
    module = InterpretableModule("cbm", spatial_dims=2, in_channels=1, num_classes=3, concepts=data.concept_specs,
                                 model_kwargs=SMALL, lr=1e-2, weight_decay=0.0)
    run = trainer(tmp_path, max_epochs=2, callbacks=[schedule, record], num_sanity_val_steps=0)
    run.fit(module, datamodule=data)
    concepts, head = record.epochs
    assert concepts["changed"] == {"backbone", "concept_evidence", "concept_bias"}
    assert head["changed"] == {"label_head"} and head["weights"][label_term] == 1.0
    assert {"train/loss_concept_epoch", "train/loss_task_from_true_concepts_epoch"} <= set(run.logged_metrics)
