"""Prototype networks build their (B, P, *s) maps only when something needs them, and stay numerically the same.

A plain training step (``explain=False``, no loss reading maps) keeps only the (B, P) smallest distances: logits, loss
terms and gradients equal those of an explained forward and those of the formulas used before (distance maps built,
ReLU, min-pooled). The loss-term finiteness check is one check per step and still names the term.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from synthetic import make_batch

from pellucid.models import create_model
from pellucid.models.prototype_layer import PrototypeLayer
from pellucid.training import InterpretableModule, NonFiniteLossError

TINY = {"prototypes_per_class": 2, "prototype_channels": 8, "backbone_kwargs": {"channels": [8, 16], "strides": [2, 2]}}
FAMILIES = ["protopnet", "protopnet_cosine", "xprotonet"]


def tiny(name: str, spatial_dims: int = 2, **kwargs):
    torch.manual_seed(0)
    return create_model(name, spatial_dims, in_channels=1, num_classes=3, **{**TINY, **kwargs}).train()


def step(model, batch: dict, explain: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
    """Forward, loss terms, backward of their sum; returns the logits, the terms and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    output = model(batch["image"], explain=explain)
    torch.manual_seed(1)  # XProtoNet's transform consistency draws its flip
    terms = model.loss_terms(output, batch)
    sum(terms.values()).backward()
    return output.logits.detach(), {k: v.detach() for k, v in terms.items()}, [
        p.grad.clone() for p in model.parameters() if p.grad is not None]


def assert_same_step(first: tuple, second: tuple) -> None:
    close = {"atol": 1e-6, "rtol": 0.0}
    torch.testing.assert_close(first[0], second[0], **close)
    assert first[1].keys() == second[1].keys()
    for name in first[1]:
        torch.testing.assert_close(first[1][name], second[1][name], **close, msg=name)
    assert len(first[2]) == len(second[2])
    for mine, theirs in zip(first[2], second[2], strict=True):
        torch.testing.assert_close(mine, theirs, **close)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", FAMILIES)
def test_a_plain_training_step_skips_the_maps_and_computes_the_same(name: str, spatial_dims: int) -> None:
    model = tiny(name, spatial_dims)
    batch = make_batch(spatial_dims, batch_size=3)
    plain = model(batch["image"], explain=False)
    assert plain.prototype_maps is None and plain.localization is None
    explained = model(batch["image"], explain=True)
    assert explained.prototype_maps is not None and explained.localization is not None
    torch.testing.assert_close(explained.prototype_similarity, plain.prototype_similarity, atol=1e-6, rtol=0.0)
    assert_same_step(step(model, batch, explain=False), step(model, batch, explain=True))


@pytest.mark.parametrize("name", FAMILIES)
def test_a_loss_that_reads_the_maps_gets_them_without_explanations(name: str) -> None:
    model = tiny(name, mask_guidance=True)
    batch = make_batch(2, batch_size=3)
    output = model(batch["image"], explain=False)
    assert output.prototype_maps is not None and output.localization is None
    assert model.needs_maps(explain=False) and not tiny(name).needs_maps(explain=False)
    assert_same_step(step(model, batch, explain=False), step(model, batch, explain=True))


def previous_forward(model, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ProtoPNet's forward before lazy maps: full distance maps (einsum), ReLU / clamp, flatten, min-pooling."""
    layer = model.prototypes
    features = model.forward_features(image)
    if layer.metric == "cosine":
        cosine = torch.einsum("bd...,pd->bp...", F.normalize(features, dim=1), F.normalize(layer.vectors, dim=1))
        distance_maps = (1.0 - cosine).clamp_min(0.0)
    else:
        squared_features = features.pow(2).sum(dim=1, keepdim=True)
        cross = torch.einsum("bd...,pd->bp...", features, layer.vectors)
        squared_prototypes = layer.vectors.pow(2).sum(dim=1).view(1, -1, *([1] * (features.ndim - 2)))
        distance_maps = F.relu(squared_features - 2.0 * cross + squared_prototypes)
    smallest = distance_maps.flatten(2).min(dim=2).values
    active = layer.active.to(smallest.dtype)
    maps = layer.similarity(distance_maps) * active.view(1, -1, *([1] * (distance_maps.ndim - 2)))
    return model.last_layer(layer.similarity(smallest) * active), smallest, maps


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", ["protopnet", "protopnet_cosine"])
def test_logits_loss_and_gradients_equal_the_previous_formulas(name: str, spatial_dims: int) -> None:
    model = tiny(name, spatial_dims).eval()  # eval: batch norm reads its running statistics, both passes alike
    batch = make_batch(spatial_dims, batch_size=3)
    with torch.no_grad():
        model.prototypes.active[1] = False  # a pruned prototype: its column is 0 in both
        model.prototypes.vectors[3] = model.forward_features(batch["image"]).flatten(2)[0, :, 0]  # pushed: distance 0
    logits, smallest, maps = previous_forward(model, batch["image"])
    label = batch["label"]
    own = model.own_prototypes(label) & model.prototypes.active
    others = ~model.own_prototypes(label) & model.prototypes.active
    expected = {"classification": F.cross_entropy(logits, label),
                "cluster": smallest.masked_fill(~own, float("inf")).min(dim=1).values.mean(),
                "separation": -smallest.masked_fill(~others, float("inf")).min(dim=1).values.mean()}
    previous = torch.autograd.grad(sum(expected.values()), list(model.parameters()), allow_unused=True)
    output = model(batch["image"], explain=False)
    terms = model.loss_terms(output, batch)
    current = torch.autograd.grad(sum(terms[k] for k in expected), list(model.parameters()), allow_unused=True)
    close = {"atol": 1e-6, "rtol": 0.0}
    torch.testing.assert_close(output.logits, logits, **close)
    torch.testing.assert_close(output.aux["prototype_distances"], smallest, **close)
    torch.testing.assert_close(model(batch["image"], explain=True).prototype_maps, maps, **close)
    for key, value in expected.items():
        torch.testing.assert_close(terms[key], value, **close, msg=key)
    for mine, theirs in zip(current, previous, strict=True):
        assert (mine is None) == (theirs is None)
        if mine is not None:
            torch.testing.assert_close(mine, theirs, **close)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_smallest_distances_keep_no_full_size_tensor_for_backward(metric: str) -> None:
    layer = PrototypeLayer(channels=6, prototype_classes=[0] * 10 + [1] * 10, num_classes=2, metric=metric)
    features = torch.rand(4, 6, 5, 5, requires_grad=True)
    full_size = 4 * 20 * 25  # (B, P, *s)
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        smallest = layer.smallest_distances(features)
    assert saved and max(saved) < full_size  # inputs (features, prototypes) and the (B, P) minima's indices only
    torch.testing.assert_close(smallest, layer.distances(features).flatten(2).min(dim=2).values, atol=0.0, rtol=0.0)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        layer.distances(features)
    assert max(saved) >= full_size  # the maps path keeps its clamped maps, as before


def test_a_plain_protopnet_training_step_keeps_no_full_size_tensor() -> None:
    model = tiny("protopnet")
    batch = make_batch(2, batch_size=3)
    full_size = 3 * model.prototypes.num_prototypes * 8 * 8  # (B, P, 8, 8): 32 px at stride 4
    for explain, keeps_maps in ((False, False), (True, True)):
        saved: list[tuple[int, ...]] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, s=saved: s.append(tuple(t.shape)) or t, lambda t: t):
            output = model(batch["image"], explain=explain)
            model.loss_terms(output, batch)
        prototype_sized = [s for s in saved if len(s) == 4 and s[1] == model.prototypes.num_prototypes]
        assert bool(prototype_sized) is keeps_maps, prototype_sized
        assert all(torch.Size(s).numel() <= full_size for s in prototype_sized)


def test_cluster_and_separation_average_over_the_samples_that_have_such_prototypes() -> None:
    model = tiny("protopnet")
    batch = make_batch(2, batch_size=3, task="multilabel")
    batch["label"] = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])  # no class / every class
    output = model(batch["image"], explain=False)
    terms = model.loss_terms(output, batch)
    distances = output.aux["prototype_distances"]
    own = model.own_prototypes(batch["label"])
    torch.testing.assert_close(terms["cluster"], torch.stack([distances[0, own[0]].min(), distances[2].min()]).mean())
    torch.testing.assert_close(terms["separation"], -torch.stack([distances[i, ~own[i]].min() for i in (0, 1)]).mean())
    none = {"image": batch["image"], "label": torch.zeros(3, 3)}
    cluster = model.loss_terms(output, none)["cluster"]
    assert float(cluster.detach()) == 0.0 and cluster.requires_grad  # no sample has a class: 0, still in the graph
    cluster.backward()
    assert torch.isfinite(model.prototypes.vectors.grad).all()


def test_one_finiteness_check_per_step_still_names_the_term() -> None:
    module = InterpretableModule("protopnet", spatial_dims=2, in_channels=1, num_classes=3, model_kwargs=TINY)
    batch = make_batch(2, batch_size=3)
    output = module.model(batch["image"], explain=False)
    total, terms = module.compute_loss(output, batch)
    assert torch.isfinite(total) and set(terms) == {"classification", "cluster", "separation", "l1"}
    original = module.model.loss_terms

    def poisoned(output, batch):
        return {**original(output, batch), "separation": torch.tensor(float("-inf"))}

    module.model.loss_terms = poisoned
    with pytest.raises(NonFiniteLossError, match=r"loss term 'separation' is -inf at global step 0"):
        module.compute_loss(output, batch)
