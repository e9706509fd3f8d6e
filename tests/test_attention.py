"""Focused tests of the attention-gated networks: gates, the segmenter, the classifier and its aggregations."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from synthetic import SIZES, RandomDataModule, make_batch

from pellucid.models import ModelOutput, create_model, validate_output
from pellucid.models.attention_classifier import attention_pool
from pellucid.models.attention_gates import GridAttentionGate
from pellucid.models.maps import resize_maps
from pellucid.training import InterpretableModule


def build(name: str, spatial_dims: int, **kwargs):
    torch.manual_seed(0)
    return create_model(name, spatial_dims, in_channels=1, **{"num_classes": 3, **kwargs})


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("subsample", [1, 2])
def test_gate_returns_coefficients_at_feature_resolution_and_applies_them(spatial_dims: int, subsample: int) -> None:
    torch.manual_seed(0)
    gate = GridAttentionGate(spatial_dims, in_channels=4, gating_channels=6, subsample=subsample)
    x_size = (9, 7) if spatial_dims == 2 else (9, 7, 5)
    x, g = torch.randn(2, 4, *x_size), torch.randn(2, 6, *(3,) * spatial_dims)
    gated, coefficients = gate(x, g)
    assert coefficients.shape == (2, 1, *x_size)
    assert 0.0 <= float(coefficients.min()) and float(coefficients.max()) <= 1.0
    torch.testing.assert_close(gated, x * coefficients)
    # the gating signal matters: another g gives other coefficients
    assert not torch.allclose(gate(x, torch.randn_like(g)).coefficients, coefficients)


def test_gate_rejects_bad_subsample() -> None:
    with pytest.raises(ValueError, match=r"subsample must be >= 1, got 0"):
        GridAttentionGate(2, 4, 4, subsample=0)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_unet_returns_every_gate_coarse_to_fine_and_their_mean_as_localization(spatial_dims: int) -> None:
    model = build("attention_unet", spatial_dims, channels=(4, 8, 16), strides=(1, 2, 2)).eval()
    image = make_batch(spatial_dims)["image"]
    output = model(image)
    validate_output(output, image, num_classes=3)
    assert output.logits is None and output.segmentation.shape == (2, 3, *image.shape[2:])
    size = image.shape[2]
    assert [gate.shape[2] for gate in output.attention] == [size // 2, size]  # one gate per skip connection
    assert output.localization.shape == (2, 1, *image.shape[2:])
    expected = model.combine_gates(output.attention, image.shape[2:])
    torch.testing.assert_close(output.localization, expected)
    assert model(image, explain=False).localization is None


def test_unet_loss_terms_are_dice_and_cross_entropy_of_the_mask_and_gate_sparsity_is_opt_in() -> None:
    model = build("attention_unet", 2, num_classes=2).eval()
    batch = make_batch(2)
    output = model(batch["image"], explain=False)
    terms = model.loss_terms(output, batch)
    assert set(terms) == {"dice", "cross_entropy"}
    target = batch["mask"][:, 0].long()
    torch.testing.assert_close(terms["cross_entropy"], torch.nn.functional.cross_entropy(output.segmentation, target))
    perfect = ModelOutput(segmentation=torch.nn.functional.one_hot(target, 2).movedim(-1, 1).float() * 40 - 20)
    assert float(model.loss_terms(perfect, batch)["dice"]) < 1e-4
    sparse = build("attention_unet", 2, num_classes=2, gate_sparsity=True).eval()
    output = sparse(batch["image"], explain=False)
    terms = sparse.loss_terms(output, batch)
    torch.testing.assert_close(terms["gate_sparsity"], torch.stack([g.mean() for g in output.attention]).mean())
    with pytest.raises(KeyError, match=r"needs a 'mask'"):
        model.loss_terms(output, {"label": batch["label"]})
    with pytest.raises(ValueError, match=r"batch\['mask'\] must have shape \(2, 1, 32, 32\), got \(2, 32, 32\)"):
        model.loss_terms(output, {"mask": batch["mask"][:, 0]})


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_unet_plain_blocks_are_monais_two_convolutions_per_stage_and_one_per_merge(spatial_dims: int) -> None:
    plain = build("attention_unet", spatial_dims, channels=(4, 8, 16), strides=(1, 2, 2), blocks="plain").eval()
    image = make_batch(spatial_dims)["image"]
    validate_output(plain(image), image, num_classes=3)
    convolution = torch.nn.Conv2d if spatial_dims == 2 else torch.nn.Conv3d

    def convolutions(module: torch.nn.Module) -> int:
        return sum(isinstance(m, convolution) for m in module.modules())

    assert [convolutions(stage) for stage in plain.encoder.stages] == [2, 2, 2]
    assert [convolutions(level.merge) for level in plain.decoder] == [1, 1]
    residual = build("attention_unet", spatial_dims, channels=(4, 8, 16), strides=(1, 2, 2)).eval()
    assert [convolutions(stage) for stage in residual.encoder.stages] == [3, 3, 3]  # and a projection each
    assert sum(p.numel() for p in plain.parameters()) < 0.8 * sum(p.numel() for p in residual.parameters())
    with pytest.raises(ValueError, match=r"block: expected one of \['residual', 'plain'\], got 'dense'"):
        create_model("attention_unet", 2, blocks="dense")


def test_unet_bad_arguments_name_themselves() -> None:
    with pytest.raises(ValueError, match=r"num_classes counts the background and must be >= 2, got 1"):
        create_model("attention_unet", 2, num_classes=1)
    with pytest.raises(ValueError, match=r"one stride per level, got channels=\[8, 16\] strides=\[2\]"):
        create_model("attention_unet", 2, channels=(8, 16), strides=(2,))


@pytest.mark.parametrize("aggregation", ["concat", "mean", "deep_supervision"])
@pytest.mark.parametrize(("global_pooling", "normalize"), [(False, False), (True, True)])
def test_classifier_logits_decompose_exactly_into_class_evidence(aggregation: str, global_pooling: bool,
                                                                  normalize: bool) -> None:
    model = build("attention_classifier", 2, aggregation=aggregation, global_pooling=global_pooling,
                  normalize_attention=normalize).eval()
    image = make_batch(2)["image"]
    output = model(image)
    maps, bias = model.class_evidence(image)
    assert len(maps) == len(output.attention) + int(global_pooling)
    reconstructed = sum(m.flatten(2).sum(dim=2) for m in maps) + bias
    torch.testing.assert_close(reconstructed, output.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_classifier_localization_is_positive_evidence_scaled_per_class(spatial_dims: int) -> None:
    model = build("attention_classifier", spatial_dims).eval()
    image = make_batch(spatial_dims)["image"]
    output = model(image)
    validate_output(output, image, num_classes=3)
    assert output.localization.shape == (2, 3, *SIZES[spatial_dims])
    peaks = output.localization.flatten(2).amax(dim=2)
    assert torch.all(((peaks - 1.0).abs() < 1e-6) | (peaks == 0))  # each class map peaks at 1 unless it is empty
    # gates are ordered coarse to fine: the finer gate has the larger map
    assert output.attention[0].shape[2] < output.attention[1].shape[2]
    maps, _ = model.class_evidence(image)
    assert [m.shape[2:] for m in maps] == [gate.shape[2:] for gate in output.attention]
    torch.testing.assert_close(model.localize(maps, image.shape[2:]), output.localization)
    # where no path has positive evidence for a class, its map is zero
    negative = [-m for m in maps]
    flipped = model.localize(negative, image.shape[2:])
    assert torch.all((flipped == 0) | (output.localization == 0))


def _localize_as_before(evidence, size):
    """The localization as written before issue 22 (out-of-place sum, clamp after the division)."""
    total = math.prod(size)
    combined = sum(resize_maps(e, size) * (math.prod(e.shape[2:]) / total) for e in evidence)
    positive = combined.clamp_min(0.0)
    peak = positive.flatten(2).amax(dim=2).view(*positive.shape[:2], *[1] * len(size))
    return (positive / torch.where(peak > 0, peak, torch.full_like(peak, math.inf))).clamp_(0.0, 1.0)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("settings", [{}, {"global_pooling": True, "aggregation": "mean", "gate_levels": [0, 1, 2]}])
def test_classifier_explanation_is_bitwise_the_previous_one_and_costs_no_graph(spatial_dims: int, settings) -> None:
    model = build("attention_classifier", spatial_dims, **settings).train()
    image = make_batch(spatial_dims)["image"]
    torch.manual_seed(1)
    explained = model(image, explain=True)
    torch.manual_seed(1)
    plain = model(image, explain=False)
    assert torch.equal(explained.logits, plain.logits)
    assert all(torch.equal(a, b) for a, b in zip(explained.attention, plain.attention, strict=True))
    # the gates' coefficients are what the gate module returns with its gated product
    stages = model.encoder(image)
    for level, gate, alpha in zip(model.gate_levels, model.gates, explained.attention, strict=True):
        assert torch.equal(gate(stages[level], stages[-1]).coefficients, alpha)
    # the map is detached (no loss reads it) and equal, bit for bit, to the previous formula's
    assert explained.logits.requires_grad and not explained.localization.requires_grad
    evidence, _ = model.class_evidence(image)
    kept = [e.detach().clone() for e in evidence]
    assert torch.equal(explained.localization, _localize_as_before(evidence, image.shape[2:]))
    assert torch.equal(model.localize(evidence, image.shape[2:]), explained.localization)
    assert all(torch.equal(e, k) for e, k in zip(evidence, kept, strict=True))  # in place only on its own copies
    negative = [-e for e in evidence]
    assert torch.equal(model.localize(negative, image.shape[2:]), _localize_as_before(negative, image.shape[2:]))


def test_attention_pool_weighted_mean_or_mean_of_gated_features() -> None:
    features = torch.arange(8.0).view(1, 2, 2, 2)
    coefficients = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    torch.testing.assert_close(attention_pool(features, coefficients, normalize=True), torch.tensor([[1.5, 5.5]]))
    # unnormalized: a closed gate removes evidence; the mean over all four locations
    torch.testing.assert_close(attention_pool(features, coefficients, normalize=False), torch.tensor([[0.75, 2.75]]))


def test_deep_supervision_adds_a_loss_term_per_gate_head_that_detach_keeps() -> None:
    model = build("attention_classifier", 2, aggregation="deep_supervision").train()
    batch = make_batch(2)
    output = model(batch["image"], explain=False)
    assert type(output) is ModelOutput and output.aux["gate_logits"].shape == (2, len(output.attention), 3)
    terms = model.loss_terms(output, batch)
    assert set(terms) == {"classification", "deep_supervision_0", "deep_supervision_1"}
    detached = output.detach()
    assert output.aux["gate_logits"].requires_grad and not detached.aux["gate_logits"].requires_grad
    with pytest.raises(ValueError, match=r"deep supervision needs the gate heads' logits"):
        model.loss_terms(ModelOutput(logits=output.logits), batch)
    concat = build("attention_classifier", 2, aggregation="concat")
    assert set(concat.loss_terms(concat(batch["image"], explain=False), batch)) == {"classification"}


def test_classifier_gate_levels_and_bad_arguments() -> None:
    model = build("attention_classifier", 2, gate_levels=[2, 0])
    assert model.gate_levels == (2, 0)  # coarse to fine; the coarsest stage is gated by itself
    assert len(model(make_batch(2)["image"]).attention) == 2
    with pytest.raises(ValueError, match=r"aggregation must be one of .*got 'max'"):
        create_model("attention_classifier", 2, aggregation="max")
    with pytest.raises(ValueError, match=r"gate_levels must be a non-empty subset of 0..2 .*got \[5\]"):
        create_model("attention_classifier", 2, gate_levels=[5])


def test_both_models_train_through_the_module_and_lower_their_loss(tmp_path) -> None:
    torch.manual_seed(0)
    for name, task, num_classes in (("attention_classifier", "multiclass", 3), ("attention_unet", "segmentation", 2)):
        data = RandomDataModule(spatial_dims=2, num_samples=8, batch_size=8, num_classes=num_classes)
        module = InterpretableModule(name, spatial_dims=2, in_channels=1, num_classes=num_classes, task=task, lr=1e-2,
                                     model_kwargs={"channels": [4, 8, 16], "strides": [2, 2, 2]})
        batch = next(iter(data.train_dataloader()))
        with torch.no_grad():  # train mode on both sides: batch-norm statistics of the batch itself
            before = float(module.compute_loss(module.model(batch["image"], explain=False), batch)[0])
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, default_root_dir=tmp_path, max_steps=8,
                             limit_val_batches=0)
        trainer.fit(module, datamodule=data)
        module.train()
        with torch.no_grad():
            after = float(module.compute_loss(module.model(batch["image"], explain=False), batch)[0])
        assert after < before, name


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_classifier_mask_guidance_moves_the_true_class_evidence_onto_the_lesion(spatial_dims: int) -> None:
    torch.manual_seed(0)
    model = create_model("attention_classifier", spatial_dims=spatial_dims, num_classes=3, channels=[8, 16, 16],
                         mask_guidance=True, mask_guidance_temperature=0.05)
    image = torch.rand(2, 1, *([16] * spatial_dims))
    mask = torch.zeros(2, 1, *([16] * spatial_dims))
    mask[0, :, :4, :4] = 1.0  # sample 1 has no lesion and adds nothing
    batch = {"label": torch.tensor([1, 2]), "mask": mask}
    output = model(image, explain=False)
    evidence = output.aux["class_evidence"]  # the paths' evidence summed at the finest gated level keeps the logits
    torch.testing.assert_close(evidence.flatten(2).sum(dim=2) + model.classifier.bias, output.logits,
                               atol=1e-5, rtol=1e-5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = float(model.loss_terms(output, batch)["mask_guidance"].detach())
    for _ in range(30):
        term = model.loss_terms(model(image, explain=False), batch)["mask_guidance"]
        optimizer.zero_grad()
        term.backward()
        optimizer.step()
    assert float(term.detach()) < 0.8 * first
    no_mask = model.loss_terms(model(image, explain=False), {"label": batch["label"]})["mask_guidance"]
    assert float(no_mask.detach()) == 0.0 and no_mask.requires_grad
    assert "class_evidence" not in model.eval()(image).aux  # loss-only, training mode only
