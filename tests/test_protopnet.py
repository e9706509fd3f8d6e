"""ProtoPNet and XProtoNet specifics: distances, similarity, last layer, loss terms, localization, mask guidance."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from synthetic import RandomDataModule, make_batch
from test_module import trainer

from pellucid.models import ModelOutput, create_model
from pellucid.models.concept_layers import ConceptBank
from pellucid.models.concepts import ConceptSpec
from pellucid.models.maps import resize_maps
from pellucid.models.prototype_losses import concept_guidance_loss, diversity_loss, lesion_cells, mask_guidance_loss
from pellucid.models.prototypes import PrototypeLayer, PrototypeSource
from pellucid.training.checkpoint import load_checkpoint
from pellucid.training.module import InterpretableModule

TINY = {"prototypes_per_class": 2, "prototype_channels": 8, "backbone_kwargs": {"channels": [8, 16], "strides": [2, 2]}}


def tiny(name: str = "protopnet", spatial_dims: int = 2, **kwargs):
    torch.manual_seed(0)
    return create_model(name, spatial_dims, in_channels=1, num_classes=3, **{**TINY, **kwargs})


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_distances_match_explicit_patch_pairs(spatial_dims: int, metric: str) -> None:
    torch.manual_seed(0)
    layer = PrototypeLayer(channels=5, prototype_classes=[0, 0, 1, 2], num_classes=3, metric=metric)
    features = torch.rand(2, 5, *([3] * spatial_dims))
    patches = features.flatten(2).transpose(1, 2)  # (B, N, D)
    if metric == "l2":
        expected = torch.cdist(patches, layer.vectors.unsqueeze(0).expand(2, -1, -1)) ** 2  # (B, N, P)
    else:
        expected = 1 - F.cosine_similarity(patches.unsqueeze(2), layer.vectors.view(1, 1, 4, 5), -1)
    got = layer.distances(features).flatten(2).transpose(1, 2)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    pooled = torch.rand(2, 4, 5)
    explicit = [layer.distances(pooled[:, p].view(2, 5, *([1] * spatial_dims)))[:, p].flatten() for p in range(4)]
    torch.testing.assert_close(layer.paired_distances(pooled), torch.stack(explicit, 1), rtol=1e-4, atol=1e-5)


def test_similarity_is_the_log_activation_and_min_pooling_picks_the_best_patch() -> None:
    model = tiny().eval()
    distances = torch.tensor([0.0, 1.0, 10.0])
    torch.testing.assert_close(model.prototypes.similarity(distances), torch.log((distances + 1) / (distances + 1e-4)))
    output = model(make_batch(2)["image"])
    torch.testing.assert_close(output.prototype_similarity, output.prototype_maps.flatten(2).amax(dim=2))
    torch.testing.assert_close(output.logits, output.prototype_similarity @ model.last_layer.weight.t())


def test_last_layer_starts_at_plus_one_own_class_minus_half_others() -> None:
    weight = tiny().last_layer.weight  # (K, P), prototypes 0-1 class 0, 2-3 class 1, 4-5 class 2
    expected = torch.full((3, 6), -0.5)
    for k in range(3):
        expected[k, 2 * k: 2 * k + 2] = 1.0
    torch.testing.assert_close(weight.detach(), expected)
    assert tiny().last_layer.bias is None


@pytest.mark.parametrize("name", ["protopnet", "xprotonet"])
def test_loss_terms_follow_the_paper(name: str) -> None:
    model = tiny(name).train()
    batch = make_batch(2, batch_size=3)
    batch["label"] = torch.tensor([0, 1, 2])
    output = model(batch["image"], explain=False)
    terms = model.loss_terms(output, batch)
    distances = output.aux["prototype_distances"]
    cluster = torch.stack([distances[i, 2 * i: 2 * i + 2].min() for i in range(3)]).mean()
    others = [torch.cat([distances[i, : 2 * i], distances[i, 2 * i + 2:]]).min() for i in range(3)]
    torch.testing.assert_close(terms["cluster"], cluster)
    torch.testing.assert_close(terms["separation"], -torch.stack(others).mean())  # returned already negated
    torch.testing.assert_close(terms["l1"], torch.tensor(6 * 2 * 0.5))  # off-class weights only
    torch.testing.assert_close(terms["classification"], F.cross_entropy(output.logits, batch["label"]))
    expected = {"classification", "cluster", "separation", "l1"}
    if name == "xprotonet":
        expected |= {"occurrence_sparsity", "transform_consistency"}
        torch.testing.assert_close(terms["occurrence_sparsity"], output.aux["occurrence_maps"].mean())
    assert set(terms) == expected


def test_localization_is_the_class_evidence_upsampled_and_scaled() -> None:
    model = tiny().eval()
    image = make_batch(2)["image"]
    output = model(image)
    evidence = torch.einsum("kp,bpxy->bkxy", model.last_layer.weight, output.prototype_maps)  # (B, K, 8, 8)
    assert output.localization.shape == (2, 3, 32, 32)
    flat = output.localization.flatten(2)
    assert torch.allclose(flat.amax(2), torch.ones(2, 3)) and torch.allclose(flat.amin(2), torch.zeros(2, 3))
    upsampled = F.interpolate(evidence, size=(32, 32), mode="bilinear", align_corners=False).flatten(2)
    low, high = upsampled.amin(2, keepdim=True), upsampled.amax(2, keepdim=True)
    torch.testing.assert_close(flat, (upsampled - low) / (high - low))  # an increasing affine map of the evidence
    assert model(image, explain=False).localization is None
    cubic = tiny(localization_interpolation="cubic").eval()
    upsampled = F.interpolate(evidence, size=(32, 32), mode="bicubic", align_corners=False).flatten(2)
    upsampled = torch.maximum(upsampled, evidence.flatten(2).amin(2, keepdim=True))  # no trough below the cells
    low, high = upsampled.amin(2, keepdim=True), upsampled.amax(2, keepdim=True)
    torch.testing.assert_close(cubic(image).localization.flatten(2), (upsampled - low) / (high - low))
    with pytest.raises(ValueError, match=r"localization_interpolation must be one of \[.*\], got 'area'"):
        tiny(localization_interpolation="area")
    with pytest.raises(ValueError, match=r"mask_guidance_resolution must be one of \['feature', 'input'\], got 'x'"):
        tiny(mask_guidance_resolution="x")


def test_cubic_localization_can_peak_between_cell_centers_and_input_guidance_asks_for_it() -> None:
    lesion = torch.zeros(1, 1, 16, 16)
    lesion[0, 0, 7:9, 7:9] = 1  # a lesion smaller than a 4-pixel cell, where four cells meet (centers 5.5 and 9.5)
    own = torch.ones(1, 1, dtype=torch.bool)
    between = torch.zeros(1, 1, 4, 4)
    between[0, 0, 1:3, 1:3] = 6.0  # the four cells around the lesion, equally active
    one_cell = torch.zeros(1, 1, 4, 4)
    one_cell[0, 0, 1, 1] = 6.0  # one of them only
    for maps, hit in ((between, True), (one_cell, False)):
        peak = resize_maps(maps, (16, 16), "cubic").flatten().argmax()
        assert bool(lesion.flatten()[peak]) is hit
    on_input = [float(mask_guidance_loss(m, lesion, own, 0.25, "input", "cubic")) for m in (between, one_cell)]
    on_cells = [float(mask_guidance_loss(m, lesion, own, 0.25)) for m in (between, one_cell)]
    assert on_input[0] < on_input[1] - 0.01  # the map that puts its peak on the lesion is penalised less
    assert on_cells[0] == pytest.approx(on_cells[1])  # on the cells both are alike: each cell is 1/16 lesion
    with pytest.raises(ValueError, match=r"mask_guidance_resolution must be one of \['feature', 'input'\]"):
        mask_guidance_loss(between, lesion, own, resolution="pixels")


@pytest.mark.parametrize("name", ["protopnet", "xprotonet"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_input_resolution_mask_guidance_trains_every_prototype_model(name: str, spatial_dims: int) -> None:
    model = tiny(name, spatial_dims, mask_guidance=True, mask_guidance_resolution="input",
                 localization_interpolation="cubic").train()
    batch = make_batch(spatial_dims)
    output = model(batch["image"])
    assert output.localization.shape[2:] == batch["image"].shape[2:]
    term = model.loss_terms(output, batch)["mask_guidance"]
    assert torch.isfinite(term) and float(term) > 0
    term.backward()
    assert model.prototypes.vectors.grad is not None and model.prototypes.vectors.grad.abs().sum() > 0


def test_mask_guidance_penalises_activation_outside_the_lesion_and_other_classes() -> None:
    maps = torch.zeros(2, 2, 4, 4)
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, 0, :4, :4] = 1  # lesion in the top-left 2x2 feature cells of sample 0; sample 1 has none
    own = torch.tensor([[True, False], [True, False]])
    maps[0, 0, :2, :2] = 12.0  # own-class prototype peaking inside the lesion: (almost) no penalty
    maps[1] = 7.0  # sample without lesion: ignored
    inside_peak = float(mask_guidance_loss(maps, mask, own))
    assert inside_peak < 1e-3
    moved = maps.clone()
    moved[0, 0] = 0.0
    moved[0, 0, 3, 3] = 12.0  # the same sharp peak outside the lesion: almost all of its mass is outside
    assert float(mask_guidance_loss(moved, mask, own)) > 0.99
    flat = maps.clone()
    flat[0, 0] = 1.0  # a flat map points nowhere: 12 of 16 cells are outside the lesion
    assert float(mask_guidance_loss(flat, mask, own)) == pytest.approx(12 / 16)
    maps[0, 1, 0, 0] = 1.6  # other-class prototype, even inside the lesion: 1.6 / 16 cells
    assert float(mask_guidance_loss(maps, mask, own)) == pytest.approx(inside_peak + 0.1, abs=1e-6)
    grazing = torch.zeros(1, 1, 8, 8)
    grazing[0, 0, 0, 0] = 1  # the lesion covers one of the top-left cell's four pixels
    peak = torch.zeros(1, 1, 4, 4)
    peak[0, 0, 0, 0] = 50.0  # a sharp peak on a cell the lesion only grazes: 3/4 of it counts as outside
    assert float(mask_guidance_loss(peak, grazing, own[:1, :1])) == pytest.approx(0.75)
    soft = torch.full((1, 1, 4, 4), 2.0)
    soft[0, 0, :2, :2] = 3.0  # peak on the lesion, but barely above the background
    one_lesion, own_one = mask[:1], own[:1, :1]
    warm, cold = (float(mask_guidance_loss(soft, one_lesion, own_one, temperature=t)) for t in (1.0, 0.25))
    assert warm == pytest.approx(12 / (4 * math.e + 12)) and cold == pytest.approx(12 / (4 * math.e**4 + 12))
    with pytest.raises(ValueError, match="mask_guidance_temperature must be > 0"):
        tiny(mask_guidance=True, mask_guidance_temperature=0.0)
    model = tiny(mask_guidance=True).train()
    batch = make_batch(2)
    terms = model.loss_terms(model(batch["image"], explain=False), batch)
    assert "mask_guidance" in terms and float(terms["mask_guidance"]) > 0
    del batch["mask"]
    assert float(model.loss_terms(model(batch["image"], explain=False), batch)["mask_guidance"]) == 0.0


def test_xprotonet_pools_features_with_its_occurrence_maps() -> None:
    model = tiny("xprotonet").eval()
    last = model.occurrence[2]
    with torch.no_grad():  # constant occurrence maps: pooling is the plain mean, flips change nothing
        last.weight.zero_()
        last.bias.fill_(0.3)
    batch = make_batch(2)
    pooled, occurrence = model.pooled_features(batch["image"])
    features = model.add_on(model.backbone(batch["image"])).flatten(2).mean(2)
    torch.testing.assert_close(pooled, features.unsqueeze(1).expand(-1, 6, -1), rtol=1e-4, atol=1e-5)
    output = model(batch["image"])
    torch.testing.assert_close(output.prototype_maps, occurrence * output.prototype_similarity.view(2, 6, 1, 1))
    terms = model.loss_terms(output, batch)
    assert float(terms["transform_consistency"]) < 1e-6
    torch.testing.assert_close(terms["occurrence_sparsity"], torch.sigmoid(torch.tensor(0.3)))


def test_pruned_prototypes_leave_decision_and_maps() -> None:
    model = tiny().eval()
    image = make_batch(2)["image"]
    with torch.no_grad():
        model.prototypes.active[1] = False
    output = model(image)
    assert float(output.prototype_similarity[:, 1].abs().max()) == 0.0 and float(output.prototype_maps[:, 1].max()) == 0
    model.last_layer.weight.data[:, 1] = 100.0  # a pruned prototype's weights cannot matter
    torch.testing.assert_close(model(image).logits, output.logits)


def test_lesion_cells_are_the_well_covered_ones_and_a_small_lesion_keeps_its_cell() -> None:
    mask = torch.zeros(3, 1, 8, 8)
    mask[0, 0, :4, :5] = 1  # covers cells (0,0),(0,1) fully and (0,2) half (2x2-pixel cells on a 4x4 grid)
    mask[1, 0, 3, 3] = 1  # one pixel: a quarter of cell (1,1), and nothing else
    cells = lesion_cells(mask, (4, 4))
    expected = torch.zeros(3, 4, 4, dtype=torch.bool)
    expected[0, :2, :3] = True
    expected[1, 1, 1] = True
    assert torch.equal(cells, expected)  # sample 2 has no lesion: no cell
    strict = torch.zeros(4, 4, dtype=torch.bool)
    strict[:2, :2] = True  # the half-covered column drops out
    assert torch.equal(lesion_cells(mask, (4, 4), min_share=0.75)[0], strict)


def test_concept_guidance_loss_asks_the_lesion_cells_for_the_annotated_findings() -> None:
    specs = [ConceptSpec("spiculated", "binary"), ConceptSpec("size_mm", "continuous", unit="mm")]
    bank = ConceptBank(specs)
    bank.update(torch.tensor([[1.0, 4.0], [0.0, 8.0]]))  # size mean 6, std 2
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, 0, :2, :2] = 1  # sample 0: lesion on cell (0, 0) of a 2x2 feature map; sample 1: none
    targets = torch.tensor([[1.0, 8.0], [0.0, 0.0]])
    right = torch.full((2, 2, 2, 2), -9.0)
    right[0, 0, 0, 0], right[0, 1, 0, 0] = 9.0, 1.0  # spiculated, size z-score (8 - 6) / 2 = 1 on the lesion cell
    assert float(concept_guidance_loss(right, targets, mask, bank)) < 1e-3  # other cells and sample 1 do not count
    wrong = right.clone()
    wrong[0, 0, 0, 0], wrong[0, 1, 0, 0] = -9.0, 3.0
    assert float(concept_guidance_loss(wrong, targets, mask, bank)) > 4.0
    grazed = mask.clone()
    grazed[0, 0, 0, 2] = 1  # the lesion now also touches cell (0, 1), a quarter of it; the logits there are wrong
    assert float(concept_guidance_loss(right, targets, grazed, bank)) < 1e-3  # the default asks only cell (0, 0)
    assert float(concept_guidance_loss(right, targets, grazed, bank, min_share=0.0)) > 4.0  # 0: every touched cell
    empty = torch.zeros_like(mask)
    logits = right.clone().requires_grad_()
    loss = concept_guidance_loss(logits, targets, empty, bank)
    assert float(loss) == 0.0 and loss.requires_grad


@pytest.mark.parametrize("name", ["protopnet", "xprotonet"])
def test_concept_guidance_trains_the_latent_patches_to_show_the_findings(name: str) -> None:
    specs = [ConceptSpec("spiculated", "binary"), ConceptSpec("size_mm", "continuous", unit="mm")]
    model = tiny(name, concept_guidance=True, concepts=specs)
    assert "concept_guidance" not in tiny(name).loss_terms(tiny(name)(make_batch(2)["image"]), make_batch(2))
    assert any(p is model.concept_probe.weight for p in model.parameter_groups()["add_on"])
    batch = make_batch(2, batch_size=8, concepts=specs)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    first = None
    for _ in range(60):
        loss = model.loss_terms(model(batch["image"], explain=False), batch)["concept_guidance"]
        first = float(loss) if first is None else first
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert float(loss) < 0.3 * first  # backbone, add-on and probe learn to read the findings on the lesion cells
    assert model.concept_bank.count[0] == 60 * 8  # every training batch updated the probe's statistics
    del batch["mask"]
    assert float(model.loss_terms(model(batch["image"]), batch)["concept_guidance"]) == 0.0
    del batch["concepts"]
    with pytest.raises(KeyError, match="the batch needs 'concepts'"):
        model.loss_terms(model(batch["image"]), batch)
    only_size = tiny(name, concept_guidance=True, concepts=specs, guided_concepts=["size_mm"])
    only_size.load_state_dict(model.state_dict())
    batch = make_batch(2, batch_size=8, concepts=specs)
    only_size.eval()
    output = only_size(batch["image"])

    def term(concepts: torch.Tensor) -> float:
        return float(only_size.loss_terms(output, {**batch, "concepts": concepts})["concept_guidance"])

    flipped, resized = batch["concepts"].clone(), batch["concepts"].clone()
    flipped[:, 0] = 1 - flipped[:, 0]
    resized[:, 1] += 5.0
    assert term(flipped) == term(batch["concepts"]) != term(resized)  # only size_mm is taught
    with pytest.raises(ValueError, match=r"guided_concepts: \['diameter'\] are not among the concepts"):
        tiny(concept_guidance=True, concepts=specs, guided_concepts=["diameter"])
    with pytest.raises(ValueError, match="concept_guidance is off"):
        tiny(guided_concepts=["size_mm"])
    with pytest.raises(ValueError, match=r"concept_guidance_min_share must be in \[0, 1\], got 1.5"):
        tiny(name, concept_guidance=True, concepts=specs, concept_guidance_min_share=1.5)
    restored = tiny(name, concept_guidance=True, concepts=specs)
    restored.load_state_dict(model.state_dict())
    torch.testing.assert_close(restored.concept_bank.std, model.concept_bank.std)
    with pytest.raises(ValueError, match="differ from the model's"):
        tiny(name, concept_guidance=True, concepts=specs[:1] + [ConceptSpec("other", "binary")]).load_state_dict(
            model.state_dict())


def test_the_training_module_gives_a_guided_prototype_network_the_data_concepts() -> None:
    specs = [ConceptSpec("spiculated", "binary"), ConceptSpec("size_mm", "continuous", unit="mm")]
    guided = InterpretableModule("protopnet", spatial_dims=2, in_channels=1, num_classes=3, concepts=specs,
                                 model_kwargs={**TINY, "concept_guidance": True})
    assert guided.model.concept_bank.concept_specs == specs
    plain = InterpretableModule("protopnet", spatial_dims=2, in_channels=1, num_classes=3, concepts=specs,
                                model_kwargs=TINY)
    assert not hasattr(plain.model, "concept_bank")
    assert "patch_concept_logits" not in plain(make_batch(2)["image"]).aux


def test_a_guided_prototype_network_survives_a_lightning_checkpoint(tmp_path) -> None:
    data = RandomDataModule()
    module = InterpretableModule("protopnet", spatial_dims=2, in_channels=1, num_classes=3,
                                 concepts=data.concept_specs,
                                 model_kwargs={**TINY, "concept_guidance": True, "guided_concepts": ["a"]})
    fit = trainer(tmp_path, max_steps=2, enable_checkpointing=True)
    fit.fit(module, datamodule=data)
    assert float(module.model.concept_bank.count[0]) > 0  # training batches updated the statistics
    restored = load_checkpoint(fit.checkpoint_callback.best_model_path or fit.checkpoint_callback.last_model_path)
    assert restored.model.concept_bank.concept_specs == data.concept_specs
    assert restored.model.guided.tolist() == [True, False]
    torch.testing.assert_close(restored.model.concept_bank.mean, module.model.concept_bank.mean)
    torch.testing.assert_close(restored.model.concept_probe.weight, module.model.concept_probe.weight)


def test_diversity_keeps_prototypes_of_a_class_apart() -> None:
    distances = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 3.0], [0.0, 3.0, 0.0]])
    classes = torch.tensor([0, 0, 1])
    active = torch.tensor([True, True, True])
    assert float(diversity_loss(distances, classes, active)) == pytest.approx(0.5)  # one same-class pair, d = 1
    assert float(diversity_loss(distances, torch.tensor([0, 0, 0]), active)) == pytest.approx((0.5 + 1 + 0.25) / 3)
    assert float(diversity_loss(distances, classes, torch.tensor([True, False, True]))) == 0.0  # no pair left
    model = tiny(prototype_diversity=True)
    assert "diversity" not in tiny().loss_terms(tiny()(make_batch(2)["image"]), make_batch(2))
    with torch.no_grad():
        model.prototypes.vectors[1] = model.prototypes.vectors[0] + 0.01  # two class-0 prototypes almost equal
    optimiser = torch.optim.SGD([model.prototypes.vectors], lr=0.5)
    batch = make_batch(2)
    before = float(model.prototypes.mutual_distances()[0, 1])
    for _ in range(20):
        loss = model.loss_terms(model(batch["image"], explain=False), batch)["diversity"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert float(model.prototypes.mutual_distances()[0, 1]) > 10 * before  # the term pushed them apart
    cosine = tiny(metric="cosine").prototypes
    torch.testing.assert_close(cosine.mutual_distances().diagonal(), torch.zeros(6), atol=1e-6, rtol=0)


def test_provenance_is_part_of_the_state_dict() -> None:
    model = tiny()
    source = PrototypeSource("s-1", 4, 0, [1, 2], [8, 8], [5.5, 9.5], [[4, 8], [8, 12]], 0.25, epoch=3)
    model.prototypes.project(torch.ones(6, 8), [source] + [None] * 5)
    state = model.state_dict()
    restored = tiny()
    restored.load_state_dict(state)
    assert restored.prototypes.sources == [source] + [None] * 5
    torch.testing.assert_close(restored.prototypes.vectors[0], torch.ones(8))
    with pytest.raises(ValueError, match="expected 6 sources, got 2 sources"):
        restored.prototypes.set_extra_state({"sources": [None, None]})


def test_bad_options_are_refused_naming_them() -> None:
    with pytest.raises(ValueError, match="metric must be 'l2' or 'cosine', got 'manhattan'"):
        tiny(metric="manhattan")
    with pytest.raises(ValueError, match="prototypes_per_class must be >= 1, got 0"):
        tiny(prototypes_per_class=0)
    with pytest.raises(TypeError, match=r"needs aux\['prototype_distances'\]"):
        tiny().loss_terms(ModelOutput(logits=torch.zeros(2, 3)), make_batch(2))
