"""Push (prototype projection): exact nearest own-class patch, provenance, triggers, checkpoints and DDP equality."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from synthetic import _Samples, make_batch
from test_module import trainer
from torch.utils.data import DataLoader

from pellucid.models import ConceptSpec, create_model
from pellucid.models.prototype_losses import lesion_cells
from pellucid.models.recipe import PushOptions, Recipe
from pellucid.training import InterpretableModule, Phase, PhaseSchedule
from pellucid.training.bundle import initialise_from
from pellucid.training.data.base import PellucidDataModule
from pellucid.training.prototypes.nearest import find_nearest_patches
from pellucid.training.prototypes.push import PrototypePush, push_dataloader, push_prototypes

TINY = {"prototypes_per_class": 2, "prototype_channels": 8, "backbone_kwargs": {"channels": [8, 16], "strides": [2, 2]}}


def tiny_model(name: str = "protopnet", spatial_dims: int = 2):
    torch.manual_seed(0)
    return create_model(name, spatial_dims, in_channels=1, num_classes=3, **TINY).eval()


class PushData(PellucidDataModule):
    """15 labelled samples (an odd count: the two DDP shards differ in size)."""

    def __init__(self, num_samples: int = 15) -> None:
        super().__init__()
        self.spatial_dims, self.in_channels, self.num_classes, self.task = 2, 1, 3, "multiclass"
        self.class_names = ["a", "b", "c"]
        self.concept_specs = [ConceptSpec("x", "binary"), ConceptSpec("y", "continuous", unit="mm")]
        batch = make_batch(2, num_samples, seed=3)
        batch["label"] = torch.arange(num_samples) % 3
        self.data = _Samples(batch)
        self.batch_size = 4

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)


def brute_force_push(model, dataset) -> tuple[torch.Tensor, list[tuple[float, int, int]]]:
    """For each prototype: (distance, sample index, flat location) of the nearest own-class patch, by full search."""
    with torch.no_grad():
        images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
        labels = torch.stack([dataset[i]["label"] for i in range(len(dataset))])
        features = model.forward_features(images).flatten(2)  # (N, D, L)
        vectors = model.prototypes.vectors
        pairs = ((features.unsqueeze(1) - vectors.view(1, *vectors.shape, 1)) ** 2).sum(2)  # (N, P, L) materialised
    best = []
    for p, klass in enumerate(model.prototypes.prototype_classes.tolist()):
        candidates = [(float(pairs[i, p, loc]), i, loc) for i in range(len(dataset)) if labels[i] == klass
                      for loc in range(pairs.shape[2])]
        best.append(min(candidates))
    return features, best


def test_push_takes_the_nearest_patch_of_an_own_class_image_and_records_it() -> None:
    model, data = tiny_model(), PushData()
    features, expected = brute_force_push(model, data.data)
    assert expected[0][1:] == expected[1][1:]  # prototypes 0 and 1 share a nearest patch: allowed without uniqueness
    report = push_prototypes(model, push_dataloader(data.data, batch_size=4), epoch=7, unique_sources=False)
    assert report.pushed == 6 and report.num_samples == 15
    for p, (distance, index, location) in enumerate(expected):
        source = model.prototypes.sources[p]
        assert (source.sample_index, source.sample_id) == (index, f"sample-3-{index}")
        assert source.label == model.prototypes.prototype_classes[p] == data.data[index]["label"]
        assert source.feature_index == [location // 8, location % 8] and source.feature_size == [8, 8]
        row, col = source.feature_index  # stride 4 on a 32x32 image: the footprint is a 4x4 block
        assert source.image_box == [[4 * row, 4 * row + 4], [4 * col, 4 * col + 4]]
        assert source.image_center == [4 * row + 1.5, 4 * col + 1.5] and source.epoch == 7
        assert source.distance == pytest.approx(distance, rel=1e-4, abs=1e-5)
        torch.testing.assert_close(model.prototypes.vectors[p], features[index, :, location])


def test_push_within_mask_takes_the_nearest_lesion_patch_and_any_patch_of_an_image_without_lesion() -> None:
    model, data = tiny_model(), PushData()
    masks = data.data.batch["mask"]
    masks.zero_()
    for i in range(15):
        if i % 5:  # samples 0, 5, 10 have no lesion
            masks[i, 0, 4 * (i % 4): 4 * (i % 4) + 8, 4 * (i % 7): 4 * (i % 7) + 4] = 1  # 2x1 feature cells
    allowed = lesion_cells(masks, (8, 8)).flatten(1)
    allowed |= ~allowed.any(dim=1, keepdim=True)
    with torch.no_grad():
        features = model.forward_features(torch.stack([data.data[i]["image"] for i in range(15)])).flatten(2)
        pairs = ((features.unsqueeze(1) - model.prototypes.vectors.view(1, 6, 8, 1)) ** 2).sum(2)  # (N, P, L)
    unrestricted = [source.feature_index for source in
                    push_prototypes(tiny_model(), push_dataloader(data.data, batch_size=4),
                                    unique_sources=False).sources]
    push_prototypes(model, push_dataloader(data.data, batch_size=4), within_mask=True, unique_sources=False)
    moved = 0
    for p, klass in enumerate(model.prototypes.prototype_classes.tolist()):
        expected = min((float(pairs[i, p, loc]), i, loc) for i in range(15) if i % 3 == klass
                       for loc in range(64) if allowed[i, loc])
        source = model.prototypes.sources[p]
        assert (source.sample_index, source.feature_index) == (expected[1], list(divmod(expected[2], 8)))
        assert source.sample_index % 5 == 0 or bool(masks[source.sample_index, 0].view(8, 4, 8, 4)[
            source.feature_index[0], :, source.feature_index[1]].any())  # on the lesion, unless none
        moved += source.feature_index != unrestricted[p]
    assert moved > 0  # the restriction changed some choices (else this test would prove nothing)
    del data.data.batch["mask"]
    with pytest.raises(KeyError, match="push batches need 'mask'"):
        push_prototypes(model, push_dataloader(data.data, batch_size=4), within_mask=True)


@pytest.mark.parametrize("name", ["protopnet", "xprotonet"])
def test_unique_push_gives_every_prototype_its_own_image_greedily_by_distance(name: str) -> None:
    model, data = tiny_model(name), PushData()
    with torch.no_grad():
        model.prototypes.vectors[1] = model.prototypes.vectors[0]  # two class-0 prototypes identical: one image
    shared = tiny_model(name)
    shared.prototypes.vectors.data.copy_(model.prototypes.vectors)
    plain = push_prototypes(shared, push_dataloader(data.data, batch_size=4), unique_sources=False)
    assert plain.sources[0].sample_index == plain.sources[1].sample_index  # the original push gives both one image
    with torch.no_grad():
        images = torch.stack([data.data[i]["image"] for i in range(15)])
        distances = model.push_candidates(images).distances.amin(dim=2)  # (N, P) nearest candidate per image
    report = push_prototypes(model, push_dataloader(data.data, batch_size=4), unique=True, epoch=2)
    chosen = [source.sample_index for source in report.sources]
    assert len(set(chosen)) == 6 and report.pushed == 6
    pairs = sorted((float(distances[i, p]), i, p) for p in range(6) for i in range(15)
                   if i % 3 == int(model.prototypes.prototype_classes[p]))
    expected: dict[int, int] = {}
    for _, sample, prototype in pairs:  # greedy by distance, one image per prototype
        if prototype not in expected and sample not in expected.values():
            expected[prototype] = sample
    assert chosen == [expected[p] for p in range(6)]
    for p, source in enumerate(report.sources):
        assert source.distance == pytest.approx(float(distances[source.sample_index, p]), rel=1e-4, abs=1e-5)
        image = data.data[source.sample_index]["image"].unsqueeze(0)
        with torch.no_grad():  # the prototype is now that image's patch: its distance there is 0
            assert float(model(image, explain=False).aux["prototype_distances"][0, p]) < 1e-5


def test_push_leaves_pruned_prototypes_alone() -> None:
    model, data = tiny_model(), PushData()
    model.prototypes.active[1] = False
    before = model.prototypes.vectors[1].clone()
    report = push_prototypes(model, push_dataloader(data.data, batch_size=4))
    assert report.pushed == 5 and report.sources[1] is None and model.prototypes.sources[1] is None
    torch.testing.assert_close(model.prototypes.vectors[1], before)


def test_push_of_xprotonet_uses_pooled_vectors_located_at_the_occurrence_peak() -> None:
    model, data = tiny_model("xprotonet"), PushData()
    push_prototypes(model, push_dataloader(data.data, batch_size=5))
    with torch.no_grad():
        for p, source in enumerate(model.prototypes.sources):
            image = data.data[source.sample_index]["image"].unsqueeze(0)
            pooled, occurrence = model.pooled_features(image)
            torch.testing.assert_close(model.prototypes.vectors[p], pooled[0, p])
            assert source.feature_index == list(divmod(int(occurrence[0, p].flatten().argmax()), 8))
            assert float(model(image, explain=False).aux["prototype_distances"][0, p]) < 1e-5


def test_nearest_patches_match_a_full_search_and_stay_bounded() -> None:
    model, data = tiny_model(), PushData()
    nearest = find_nearest_patches(model, push_dataloader(data.data, batch_size=4), k=3)
    with torch.no_grad():
        images = torch.stack([data.data[i]["image"] for i in range(15)])
        per_image = model(images, explain=False).aux["prototype_distances"]  # (N, P): each image's closest patch
    order = per_image.t().argsort(dim=1)[:, :3]
    assert nearest.sample_index.tolist() == order.tolist()
    torch.testing.assert_close(nearest.distance, per_image.t().gather(1, order))
    assert nearest.ids[0] == [f"sample-3-{i}" for i in order[0].tolist()]
    labels = torch.arange(15) % 3
    expected_same = labels[order] == model.prototypes.prototype_classes.view(-1, 1)
    assert torch.equal(nearest.same_class, expected_same)


class RecordPushes(pl.Callback):
    def __init__(self) -> None:
        self.epochs: list[tuple[int, str]] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append((trainer.current_epoch, pl_module.current_phase))


def pushes_of(run: pl.Trainer) -> list[int]:
    """Epochs at which the run's push callback pushed."""
    (push,) = [callback for callback in run.callbacks if isinstance(callback, PrototypePush)]
    return [report.sources[0].epoch for report in push.reports]


def test_push_runs_when_a_push_phase_of_the_recipe_starts_and_every_n_epochs(tmp_path) -> None:
    recipe = Recipe(phases=[Phase("warmup", 1, train=["add_on", "prototypes"]),
                            Phase("last_layer", 1, train=["last_layer"], push=True),
                            Phase("joint", 1), Phase("last_layer_2", 1, train=["last_layer"], push=True)],
                    push=PushOptions(batch_size=8))
    module = InterpretableModule("protopnet", spatial_dims=2, in_channels=1, num_classes=3, model_kwargs=TINY,
                                 recipe=recipe)
    run = trainer(tmp_path, max_epochs=4, limit_train_batches=1, limit_val_batches=0)
    run.fit(module, datamodule=PushData())
    assert pushes_of(run) == [1, 3]
    assert run.logged_metrics["push/prototypes_pushed"] == 6.0
    periodic = PrototypePush(every_n_epochs=2)
    trainer(tmp_path, max_epochs=5, limit_train_batches=1, limit_val_batches=0, callbacks=[periodic]).fit(
        InterpretableModule("protopnet", spatial_dims=2, in_channels=1, num_classes=3, model_kwargs=TINY,
                            recipe="off"),
        datamodule=PushData())
    assert [r.sources[0].epoch for r in periodic.reports] == [2, 4]


@pytest.mark.parametrize("max_epochs", [1, 2, 3, 5])
def test_the_family_recipe_ends_every_budget_pushed_with_a_last_layer_phase(tmp_path, max_epochs) -> None:
    module = InterpretableModule("protopnet", spatial_dims=2, in_channels=1, num_classes=3, model_kwargs=TINY)
    phases = RecordPushes()
    run = trainer(tmp_path, max_epochs=max_epochs, limit_train_batches=1, limit_val_batches=0, callbacks=[phases])
    run.fit(module, datamodule=PushData())
    pushes = pushes_of(run)
    assert pushes and pushes[-1] <= max_epochs - 1
    after_last_push = [phase for epoch, phase in phases.epochs if epoch >= pushes[-1]]
    assert after_last_push and all(phase.startswith("last_layer") for phase in after_last_push)
    assert all(source is not None for source in module.model.prototypes.sources)


def test_provenance_survives_a_lightning_checkpoint(tmp_path) -> None:
    module = InterpretableModule("protopnet", spatial_dims=2, in_channels=1, num_classes=3, model_kwargs=TINY,
                                 recipe=Recipe(phases=[Phase("last_layer", 1, train=["last_layer"], push=True)]))
    run = trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    run.fit(module, datamodule=PushData())
    run.save_checkpoint(tmp_path / "pushed.ckpt")
    restored = InterpretableModule.load_from_checkpoint(tmp_path / "pushed.ckpt")
    assert restored.model.prototypes.sources == module.model.prototypes.sources
    assert all(s is not None and s.sample_id.startswith("sample-3-") for s in restored.model.prototypes.sources)
    torch.testing.assert_close(restored.model.prototypes.vectors, module.model.prototypes.vectors)
    module.model.prototypes.active[0] = False
    run.save_checkpoint(tmp_path / "pruned.ckpt")
    fine_tune = InterpretableModule("protopnet", spatial_dims=2, in_channels=1, num_classes=3, model_kwargs=TINY)
    report = initialise_from(fine_tune, tmp_path / "pruned.ckpt")  # same classes: every tensor is copied
    torch.testing.assert_close(fine_tune.model.prototypes.vectors, module.model.prototypes.vectors)
    assert fine_tune.model.prototypes.sources == [None] * 6 and bool(fine_tune.model.prototypes.active.all())
    assert any("forgot the provenance of 6 pushed prototype(s) and the pruning of 1" in line for line in report)


def test_push_callback_refuses_bad_setups(tmp_path) -> None:
    with pytest.raises(ValueError, match="give epochs"):
        PrototypePush()
    module = InterpretableModule("protopnet", spatial_dims=2, in_channels=1, num_classes=3, model_kwargs=TINY)
    for listed in (PhaseSchedule([Phase("joint", 1)]), PrototypePush(epochs=[0])):
        with pytest.raises(ValueError, match=f"lists a {type(listed).__name__} while the model's recipe has one"):
            trainer(tmp_path, max_epochs=1, callbacks=[listed]).fit(module, datamodule=PushData())
    blackbox = InterpretableModule("blackbox", spatial_dims=2, in_channels=1, num_classes=3)
    with pytest.raises(TypeError, match="needs a prototype network, got BlackBox"):
        trainer(tmp_path, max_epochs=1, callbacks=[PrototypePush(every_n_epochs=1)]).fit(
            blackbox, datamodule=PushData())


class SameOnEveryRank(pl.Callback):
    """Fails the run if the processes hold different prototypes after the push."""

    def on_train_epoch_end(self, trainer, pl_module):
        vectors = trainer.strategy.all_gather(pl_module.model.prototypes.vectors.detach())
        if not torch.equal(vectors[0], vectors[-1]):
            raise AssertionError("processes disagree on the pushed prototypes")
        ids = [None] * trainer.world_size
        torch.distributed.all_gather_object(ids, [s.sample_id for s in pl_module.model.prototypes.sources])
        if ids[0] != ids[-1]:
            raise AssertionError(f"processes disagree on the provenance: {ids}")


def pushed_module(tmp_path, devices: int) -> InterpretableModule:
    """Fit one step with lr 0: only the push (at the start of the single phase) changes the prototypes."""
    torch.manual_seed(0)
    recipe = Recipe(phases=[Phase("last_layer", 1, push=True)], push=PushOptions(batch_size=3))
    module = InterpretableModule("protopnet", spatial_dims=2, in_channels=1, num_classes=3, model_kwargs=TINY,
                                 lr=0.0, weight_decay=0.0, recipe=recipe)
    callbacks = []
    options = dict(max_epochs=1, limit_train_batches=1, limit_val_batches=0, num_sanity_val_steps=0)
    if devices > 1:
        options.update(devices=devices, strategy="ddp_spawn")
        callbacks.append(SameOnEveryRank())
    trainer(tmp_path, callbacks=callbacks, **options).fit(module, datamodule=PushData())
    return module


def test_ddp_push_over_two_processes_equals_one_process(tmp_path) -> None:
    single = pushed_module(tmp_path / "one", devices=1).model.prototypes
    initial = tiny_model().prototypes.vectors
    assert not torch.allclose(single.vectors, initial)  # the push did replace them
    double = pushed_module(tmp_path / "two", devices=2).model.prototypes  # weights come back from rank 0
    torch.testing.assert_close(double.vectors, single.vectors, rtol=1e-5, atol=1e-6)
    for one, two in zip(single.sources, double.sources, strict=True):
        assert (two.sample_id, two.sample_index, two.feature_index, two.label) == (
            one.sample_id, one.sample_index, one.feature_index, one.label)
        assert math.isclose(two.distance, one.distance, rel_tol=1e-4, abs_tol=1e-6)
