"""PIP-Net: the mathematics on hand-computed cases, the clamped scoring sheet in a real fit, abstention, sources."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from synthetic import RandomDataModule, make_batch
from torch import nn

from pellucid.models import InputError, create_model, load_pretrained
from pellucid.models.pipnet import PIPNet
from pellucid.models.pipnet_losses import (
    alignment_loss,
    geometric_view,
    patch_share_excess_loss,
    scoring_classification_loss,
    tanh_uniformity_loss,
    training_view,
    undo_geometry,
)
from pellucid.models.recipe import Phase, PushOptions, Recipe, fit_phases
from pellucid.training import InterpretableModule
from pellucid.training.data import PhantomConfig, PhantomGenerator
from pellucid.training.elements.evaluator import ExplanationEvaluator
from pellucid.training.elements.transparency import decision_terms
from pellucid.training.prototypes.push import PrototypePush
from pellucid.training.prototypes.push_data import push_dataloader
from pellucid.training.prototypes.sources import find_prototype_sources

TINY = {"backbone_kwargs": {"channels": [8, 16], "strides": [2, 2]}, "num_prototypes": 6}
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from evaluate_pipnet import abstention_shares, unfamiliar_images  # noqa: E402


def trainer(root, **options) -> pl.Trainer:
    settings = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                    enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=root)
    return pl.Trainer(**{**settings, **options})


class IntensityPatches(nn.Module):
    """Latent patches (x, 0.3) per pixel: their direction tells bright (x > 0), dark (x < 0) and blank (x = 0) apart."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.cat([image, torch.full_like(image, 0.3)], dim=1)


def intensity_model(weights: list[list[float]], threshold: float = 0.4,
                    blank_prototype: tuple[float, float] = (0.0, 1.0)) -> PIPNet:
    """A PIP-Net on pixel intensities: prototype 0 is bright, 1 dark, 2 blank (scale 10: presences ~0.999)."""
    model = PIPNet(2, num_classes=2, num_prototypes=3, presence_threshold=threshold).eval()
    model.backbone = IntensityPatches()
    model.add_on = nn.Conv2d(2, 3, kernel_size=1, bias=False)
    with torch.no_grad():
        model.add_on.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], list(blank_prototype)]).view(3, 2, 1, 1))
        model.scoring_sheet.copy_(torch.tensor(weights))
    return model


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_patch_presence_is_a_softmax_over_the_prototypes_at_every_location(spatial_dims: int) -> None:
    torch.manual_seed(0)
    model = create_model("pipnet", spatial_dims, num_classes=3, **TINY).eval()
    presence = model.presence_maps(make_batch(spatial_dims)["image"])
    assert presence.shape[1] == 6 and bool((presence >= 0).all())
    torch.testing.assert_close(presence.sum(dim=1), torch.ones_like(presence[:, 0]))
    output = model(make_batch(spatial_dims)["image"])
    kept = output.prototype_similarity > 0
    torch.testing.assert_close(output.prototype_similarity, presence.flatten(2).amax(dim=2) * kept)  # max-pooled


def test_alignment_and_uniformity_losses_equal_their_hand_computed_values() -> None:
    # two latent patches (a 1x2 map), three prototypes
    first = torch.tensor([[0.5, 1.0], [0.5, 0.0], [0.0, 0.0]]).view(1, 3, 1, 2).requires_grad_()
    second = torch.tensor([[0.5, 0.5], [0.25, 0.5], [0.25, 0.0]]).view(1, 3, 1, 2).requires_grad_()
    # dot products per patch: 0.5 * 0.5 + 0.5 * 0.25 = 0.375 and 1 * 0.5 = 0.5
    expected = -(math.log(0.375) + math.log(0.5)) / 2
    loss = alignment_loss(first, second, epsilon=0.0)
    assert math.isclose(float(loss), expected, rel_tol=1e-6)
    loss.backward()  # each view is pulled towards the other's detached presences: both get gradients
    assert first.grad is not None and second.grad is not None
    torch.testing.assert_close(first.grad[0, :, 0, 0], -0.5 * torch.tensor([0.5, 0.25, 0.25]) / 0.375 / 2)
    identical = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]).view(1, 3, 1, 2)
    assert float(alignment_loss(identical, identical.clone())) == pytest.approx(0.0, abs=1e-6)
    # two images, three prototypes: per-prototype batch sums 0.5, 0.9 and 0 (absent: costs -log(eps))
    pooled = torch.tensor([[0.2, 0.9, 0.0], [0.3, 0.0, 0.0]])
    expected = -(math.log(math.tanh(0.5) + 1e-8) + math.log(math.tanh(0.9) + 1e-8) + math.log(1e-8)) / 3
    assert math.isclose(float(tanh_uniformity_loss(pooled)), expected, rel_tol=1e-6)


def test_classification_reads_the_scores_through_log_one_plus_square() -> None:
    scores, label = torch.tensor([[0.0, 1.0], [2.0, 0.0]]), torch.tensor([1, 1])
    # inputs of the softmax: [0, log 2] and [log 5, 0]
    first = -math.log(2 / (1 + 2))
    second = -math.log(1 / (5 + 1))
    assert math.isclose(float(scoring_classification_loss(scores, label)), (first + second) / 2, rel_tol=1e-6)
    with pytest.raises(ValueError, match=r"expected \(B,\) class indices .* got labels of shape \(2, 2\)"):
        scoring_classification_loss(scores, torch.ones(2, 2))


def test_scores_logits_head_and_localization_follow_the_scoring_sheet() -> None:
    model = intensity_model([[0.0, 0.0, 2.0], [3.0, 0.0, 0.0]], threshold=0.1)
    image = torch.zeros(1, 1, 4, 4)
    image[0, 0, 1, 2] = 1.0  # one bright pixel: prototype 0 present there (presence ~1)
    output = model(image)
    presence = model.presence_maps(image)
    pooled = presence.flatten(2).amax(dim=2)[0]
    expected_scores = torch.tensor([2.0 * pooled[2], 3.0 * pooled[0]])  # prototype 1 carries no weight
    assert float(pooled[0]) > 0.99 and float(pooled[2]) > 0.99
    torch.testing.assert_close(output.logits[0], expected_scores)
    torch.testing.assert_close(model.explanation_head().logits(image, output), output.logits)
    assert model.prototype_classes().tolist() == [1, -1, 0]  # the class each weighs most for; -1: no weight
    assert float(output.prototype_similarity[0, 1]) == 0.0 and float(output.prototype_maps[0, 1].abs().max()) == 0.0
    evidence = output.localization[0, 1]  # class 1: 3 * presence of prototype 0, same resolution, scaled to [0, 1]
    manual = 3.0 * presence[0, 0]
    torch.testing.assert_close(evidence, (manual - manual.min()) / (manual.max() - manual.min()))
    assert evidence.argmax().item() == 1 * 4 + 2 and not bool(output.aux["abstained"][0])


def test_abstains_on_a_blank_image_and_not_on_an_image_with_a_learned_part() -> None:
    model = intensity_model([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # prototype 2 (blank patches) carries no weight
    blank = torch.zeros(2, 1, 8, 8)  # zeros and a constant
    blank[1] = 0.01
    part = torch.zeros(1, 1, 8, 8)
    part[0, 0, 3:5, 3:5] = 1.0
    out_blank, out_part = model(blank), model(part)
    assert float(out_blank.aux["presence_maps"][:, 0, 2].min()) > 0.99  # blank patches fully show prototype 2 ...
    assert out_blank.aux["abstained"].tolist() == [True, True] and model.abstentions(out_blank).dtype == torch.bool
    assert float(out_blank.logits.abs().max()) == 0.0 and float(out_blank.localization.max()) == 0.0  # ... unweighted
    assert out_part.aux["abstained"].tolist() == [False] and out_part.logits.argmax(dim=1).tolist() == [1]
    # a blank patch like no prototype (its vector 0): every presence 1/3 < 0.4, so even a weighted one is absent
    unlike = intensity_model([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]], blank_prototype=(0.0, 0.0))
    presence = unlike(blank[:1]).aux["presence_maps"][:, 0]
    torch.testing.assert_close(presence, torch.full_like(presence, 1 / 3))
    assert unlike(blank[:1]).aux["abstained"].tolist() == [True] and not bool(unlike(part).aux["abstained"][0])


def test_mask_guidance_penalises_true_class_evidence_off_the_lesion() -> None:
    model = intensity_model([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    model.mask_guidance, model.mask_guidance_temperature = True, 0.1
    image = torch.zeros(2, 1, 16, 16)
    image[:, :, 4:8, 4:8] = 1.0  # class 1's evidence (prototype 0) sits on this square
    on, off = torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16)
    on[..., 4:8, 4:8], off[..., 10:14, 10:14] = 1.0, 1.0
    label = torch.tensor([1])
    output = model(image[:1])
    terms = {name: float(model.loss_terms(output, {"label": label, "mask": mask})["mask_guidance"])
             for name, mask in (("on", on), ("off", off))}
    assert terms["on"] < 0.01 and terms["off"] > 0.99  # share of the evidence's spatial softmax off the lesion
    assert float(model.loss_terms(output, {"label": label})["mask_guidance"]) == 0.0  # no mask: nothing to point at
    recipe = model.default_recipe()
    assert [phase.loss_weights.get("mask_guidance") for phase in recipe.phases] == [0.0, 2.0, 2.0]


def test_patch_balance_costs_the_largest_patch_share_beyond_the_cap() -> None:
    # 3 of 4 patches on prototype 0, 1 on prototype 2 (one image, 2x2 patches, 3 prototypes): shares 0.75, 0, 0.25
    mixed = torch.zeros(1, 3, 2, 2)
    mixed[0, 0].view(-1)[:3], mixed[0, 2].view(-1)[3] = 1.0, 1.0
    assert float(patch_share_excess_loss(mixed, 0.6)) == pytest.approx(0.15, abs=1e-6)
    at_cap = mixed.clone().requires_grad_()
    patch_share_excess_loss(at_cap, 0.75).backward()
    assert at_cap.grad is not None and not at_cap.grad.any()  # at the cap: no cost, no gradient
    soft = torch.full((2, 4, 3, 3), 0.25).requires_grad_()
    excess = patch_share_excess_loss(soft, 0.2)
    assert float(excess) == pytest.approx(0.05, abs=1e-6)
    excess.backward()  # above the cap the gradient reaches the largest share's presences (here the first, on a tie)
    assert soft.grad is not None and soft.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="presence maps"):
        patch_share_excess_loss(torch.ones(2, 4), 0.5)


def test_patch_balance_is_a_term_of_the_recipe_only_when_enabled() -> None:
    plain, balanced = (create_model("pipnet", spatial_dims=2, num_classes=3, patch_balance=w) for w in (0.0, 0.5))
    batch = {"label": torch.tensor([0, 2])}
    image = torch.rand(2, 1, 32, 32)
    assert "patch_balance" not in plain.train().loss_terms(plain(image), batch)
    term = balanced.train().loss_terms(balanced(image), batch)["patch_balance"]
    assert term.requires_grad and 0.0 <= float(term) <= 1.0 - balanced.patch_balance_cap
    assert [phase.loss_weights.get("patch_balance") for phase in balanced.default_recipe().phases] == [0.5, 0.5, 0.0]
    assert all("patch_balance" not in phase.loss_weights for phase in plain.default_recipe().phases)


def test_prototypes_per_decision_and_the_share_abstained_are_measured_by_the_evaluation() -> None:
    model = intensity_model([[0.0, 0.0, 1.0], [1.0, 0.0, 0.5]])
    image = torch.zeros(3, 1, 8, 8)
    image[0, 0, :4] = 1.0  # prototypes 0 and 2 present (2 on the dark half): class 1 reads both
    image[1] = 1.0  # prototype 0 alone: class 1 reads one
    image[2] = -1.0  # prototype 1 alone, which no class weighs: no decision
    output = model(image)
    assert output.logits.argmax(dim=1)[:2].tolist() == [1, 1]
    assert decision_terms(model.explanation_head(), image, output).tolist() == [2.0, 1.0, 0.0]
    assert output.aux["abstained"].tolist() == [False, False, True]
    evaluator = ExplanationEvaluator(deletion_samples=0)
    evaluator.update(model, output, {"image": image, "label": torch.tensor([1, 1, 0])})
    values = {row.name: row.value for row in evaluator.compute().metrics}
    assert values["head_terms_per_decision"] == pytest.approx(1.0)
    assert values["abstention_share"] == pytest.approx(1 / 3)


def test_the_scoring_sheet_is_non_negative_after_every_step_of_a_real_fit(tmp_path) -> None:
    class Check(pl.Callback):
        def __init__(self) -> None:
            self.minimum, self.raw_minimum, self.steps = math.inf, math.inf, 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            model = pl_module.model
            self.minimum = min(self.minimum, float(model.class_weights().min()),
                               float(model.explanation_head().weight.min()))
            self.raw_minimum = min(self.raw_minimum, float(model.scoring_sheet.min()))
            self.steps += 1

    torch.manual_seed(0)
    recipe = Recipe(phases=[Phase("joint", 3, lr={"scoring_sheet": 0.05}, loss_weights={"sparsity": 1.0})])
    module = InterpretableModule("pipnet", spatial_dims=2, in_channels=1, num_classes=3, recipe=recipe,
                                 model_kwargs={**TINY, "initial_weight": 0.1})
    check = Check()
    trainer(tmp_path, max_epochs=3, callbacks=[check]).fit(module, datamodule=RandomDataModule(num_samples=16))
    assert check.steps == 12
    assert check.raw_minimum < 0.0  # the optimizer did push stored weights below zero ...
    assert check.minimum >= 0.0  # ... and the weights the model computes with stayed >= 0 at every step
    assert float((module.model.class_weights() == 0).float().mean()) > 0.0  # sparsity reached exact zeros


def test_sources_found_after_training_are_the_patches_of_highest_presence(tmp_path) -> None:
    torch.manual_seed(0)
    data = RandomDataModule(num_samples=12, batch_size=4)
    module = InterpretableModule("pipnet", spatial_dims=2, in_channels=1, num_classes=3,
                                 model_kwargs={**TINY, "presence_threshold": 0.0})
    phases = [phase.name for phase in fit_phases(module.recipe.phases, 3)]
    assert phases == ["pretrain", "joint", "scoring_sheet"] and module.recipe.phases[-1].push
    saving = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, max_epochs=3, limit_val_batches=1, enable_checkpointing=True, callbacks=[saving]).fit(
        module, datamodule=data)
    model = module.model.eval()
    with torch.no_grad():
        maps = model(torch.stack([data.data[i]["image"] for i in range(12)])).prototype_maps  # (12, P, 8, 8)
    provenance = model.prototype_provenance()
    assert len(provenance) == 6 and all(source is not None for source in provenance)
    flat = maps.flatten(1 + 0).view(12, 6, -1)
    for p, source in enumerate(provenance):
        value, where = flat[:, p].flatten().max(dim=0)
        image, cell = divmod(int(where), flat.shape[2])
        assert (source["sample_index"], source["sample_id"]) == (image, data.data[image]["id"])
        assert source["feature_index"] == [cell // 8, cell % 8] and source["feature_size"] == [8, 8]
        assert source["label"] == int(data.data[image]["label"]) and source["epoch"] == 2  # after the last step
        assert source["image_box"] == [[4 * (cell // 8), 4 * (cell // 8) + 4], [4 * (cell % 8), 4 * (cell % 8) + 4]]
        assert math.isclose(source["distance"], 1.0 - float(value), abs_tol=1e-6)
    with torch.no_grad():  # the same pass set the abstention thresholds from the training images' scores
        top = model(torch.stack([data.data[i]["image"] for i in range(12)])).logits.max(dim=1)
    for k in range(3):
        values = top.values[top.indices == k]
        expected = torch.quantile(values, 0.02) if values.numel() else torch.tensor(0.0)
        torch.testing.assert_close(model.abstention_thresholds[k], expected)
    assert bool((model.abstention_thresholds > 0).any())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]  # the checkpoint has both
    assert saved["model.sources._extra_state"]["sources"] == provenance
    torch.testing.assert_close(saved["model.abstention_thresholds"], model.abstention_thresholds)
    state = model.state_dict()
    restored = create_model("pipnet", 2, num_classes=3, **TINY, presence_threshold=0.0)
    restored.load_state_dict(state)
    assert restored.prototype_provenance() == provenance  # the sources travel with the weights
    torch.testing.assert_close(restored.abstention_thresholds, model.abstention_thresholds)
    assert restored.forget_training_data() and restored.prototype_provenance() == [None] * 6
    assert float(restored.abstention_thresholds.abs().max()) == 0.0


def test_abstention_thresholds_are_a_low_quantile_of_each_predicted_class_and_flag_weaker_scores() -> None:
    model = intensity_model([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    model.abstention_quantile = 0.5
    logits = torch.tensor([[0.0, 2.0], [0.0, 4.0], [0.0, 6.0], [3.0, 1.0], [0.0, 0.0]])  # the last: no evidence
    model.calibrate_abstention(logits)
    assert model.abstention_thresholds.tolist() == [3.0, 4.0]  # medians of the top scores of each predicted class
    part = torch.zeros(2, 1, 8, 8)
    part[0, 0, 3:5, 3:5] = 1.0  # prototype 0 fully present: class 1 scores ~1 < 4
    part[1, 0, 3:5, 3:5] = -1.0  # prototype 1 fully present: class 0 scores ~1 < 3
    assert model(part).aux["abstained"].tolist() == [True, True]
    model.calibrate_abstention(0.2 * logits)
    assert model(part).aux["abstained"].tolist() == [False, False]  # thresholds 0.6 and 0.8 now


def test_finding_sources_leaves_the_model_unchanged_and_refuses_push_only_options(tmp_path) -> None:
    torch.manual_seed(0)
    model = intensity_model([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # the blank prototype 2 carries no weight
    data = RandomDataModule(num_samples=8)  # images: noise around 0, 1 or 2
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    report = find_prototype_sources(model, push_dataloader(data.data, 3))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor))
    assert report.num_samples == 8 and report.logits.shape == (8, 2)
    torch.testing.assert_close(report.logits, model(torch.stack([data.data[i]["image"] for i in range(8)])).logits)
    assert report.sources[0] is not None and report.sources[1] is not None
    assert report.sources[2] is None  # no weight: its maps are 0, nothing to show
    torch.manual_seed(0)
    module = InterpretableModule("pipnet", spatial_dims=2, in_channels=1, num_classes=3, model_kwargs=TINY,
                                 recipe=Recipe(phases=[Phase("scoring_sheet", 1, push=True)],
                                               push=PushOptions(unique=True)))
    with pytest.raises(ValueError, match=r"pruning, within_mask and unique need prototypes that push replaces"):
        trainer(tmp_path, max_epochs=1).fit(module, datamodule=data)
    assert isinstance(PrototypePush(epochs=[0]), pl.Callback)


@pytest.mark.parametrize("max_epochs", [1, 2, 7, 30, 100])
def test_the_recipe_fits_any_budget_ending_with_sources_and_the_scoring_sheet_alone(max_epochs: int) -> None:
    recipe = create_model("pipnet", 2, num_classes=3, **TINY).default_recipe()
    phases = fit_phases(recipe.phases, max_epochs)
    assert sum(p.epochs for p in phases) == max_epochs
    assert phases[-1].name == "scoring_sheet" and phases[-1].push and phases[-1].train == ["scoring_sheet"]
    assert all(not p.push for p in phases[:-1])
    if len(phases) == 3:
        assert not phases[0].trains("scoring_sheet") and phases[0].loss_weights["classification"] == 0.0


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_the_second_view_s_presences_map_back_onto_the_first_view_s_patches(spatial_dims: int) -> None:
    torch.manual_seed(0)
    image = torch.rand(6, 1, *[16] * spatial_dims)
    pool = nn.functional.avg_pool2d if spatial_dims == 2 else nn.functional.avg_pool3d
    moved, offsets, mirror = geometric_view(image, stride=4, cells=1)
    assert any(any(row) for row in offsets) and bool(mirror.any())
    back, covered = undo_geometry(pool(moved, 4), offsets, mirror)  # a translation-equivariant "presence" per cell
    original = pool(image, 4)
    torch.testing.assert_close(back[:, 0][covered], original[:, 0][covered])
    for b, row in enumerate(offsets):  # a patch is covered when the moved view still shows it
        assert int(covered[b].sum()) == math.prod(4 - abs(o) for o in row)
    assert float(back[:, 0][~covered].abs().sum()) == 0.0


def test_training_views_stay_aligned_and_multi_label_targets_are_refused() -> None:
    torch.manual_seed(0)
    image = torch.zeros(3, 1, 16, 16)
    image[:, :, 6:10, 6:10] = 1.0
    view = training_view(image, gain=0.0, offset=0.0, noise=0.0, shift_by=2)
    assert view.shape == image.shape
    for b in range(3):  # the bright square moved by at most 2 pixels per axis, nothing else changed
        rows, cols = torch.nonzero(view[b, 0] > 0.5, as_tuple=True)
        assert 4 <= int(rows.min()) <= 8 and int(rows.max()) - int(rows.min()) == 3
        assert 4 <= int(cols.min()) <= 8 and int(cols.max()) - int(cols.min()) == 3
    model = create_model("pipnet", 2, num_classes=3, **TINY).train()
    batch = make_batch(2, task="multilabel")
    with pytest.raises(ValueError, match="cannot learn multi-label targets"):
        model.loss_terms(model(batch["image"], explain=False), batch)
    with pytest.raises(InputError, match="expected 1 input channel"):
        model(torch.zeros(1, 2, 16, 16))
    with pytest.raises(ValueError, match="num_prototypes must be >= 2"):
        create_model("pipnet", 2, num_prototypes=1)


def test_the_shipped_bundle_abstains_on_unfamiliar_images_and_rarely_on_test_scans() -> None:
    model, metadata = load_pretrained("pipnet_phantom2d")
    assert metadata["model"]["name"] == "pipnet" and bool((model.abstention_thresholds > 0).all())
    with torch.no_grad():
        blank = model(torch.zeros(1, 1, 64, 64))
    assert blank.aux["abstained"].tolist() == [True]
    shares = abstention_shares(model, unfamiliar_images(count=50, seed=3))
    assert shares["blank"] >= 0.9 and shares["marker_only"] >= 0.9, shares
    generator = PhantomGenerator(PhantomConfig(spatial_dims=2), seed=0)
    scans = torch.from_numpy(np.stack([generator.sample("test", i).image for i in range(200)]))
    assert abstention_shares(model, {"scans": scans})["scans"] <= 0.05
    assert sum(source is not None for source in model.prototype_provenance()) >= 3  # sources, with provenance


def test_a_loss_weight_the_recipe_s_phases_set_themselves_is_named_in_a_warning() -> None:
    # PIP-Net's phases weigh every term themselves: a module-level weight for one of them would be silently ignored
    with pytest.warns(UserWarning, match=r"loss_weights\['patch_balance'\] = 0.1 is overridden .* pretrain \(1\), "
                                         r"joint \(1\), scoring_sheet \(0\)"):
        InterpretableModule(model="pipnet", spatial_dims=2, in_channels=1, num_classes=3,
                            model_kwargs={"patch_balance": 1.0}, loss_weights={"patch_balance": 0.1})
