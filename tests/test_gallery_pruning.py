"""Prototype gallery (arrays, figures, PNG files, 3D slices) and pruning (duplicates merged, impure removed)."""

from __future__ import annotations

from dataclasses import replace

import matplotlib.image
import numpy as np
import pytest
import torch
from synthetic import _Samples, make_batch
from test_module import trainer
from test_push import TINY, PushData

from pellucid.models import create_model
from pellucid.models.recipe import PruningOptions, PushOptions, Recipe
from pellucid.training import InterpretableModule, Phase
from pellucid.training.prototypes.gallery import build_gallery, overlay_rgb, patch_views, save_gallery
from pellucid.training.prototypes.nearest import NearestPatches, find_nearest_patches
from pellucid.training.prototypes.pruning import PrototypePruning
from pellucid.training.prototypes.push import PrototypePush, push_dataloader, push_prototypes


def pushed(spatial_dims: int, name: str = "protopnet"):
    torch.manual_seed(0)
    model = create_model(name, spatial_dims, in_channels=1, num_classes=3, **TINY).eval()
    data = _Samples(make_batch(spatial_dims, 9, seed=1))
    push_prototypes(model, push_dataloader(data, batch_size=4))
    return model, data


def test_patch_views_box_the_top_activation_and_cut_3d_through_the_peak() -> None:
    activation = np.zeros((10, 12))
    activation[2:5, 7:10] = 1.0  # 9 of 120 pixels: above the 95th percentile
    image = np.random.default_rng(0).random((10, 12))
    (view,) = patch_views(image, activation)
    assert view.box == (2, 5, 7, 10) and view.crop.shape == (3, 3)
    volume = np.zeros((6, 7, 8))
    volume[1:3, 4:6, 2:5] = 0.5
    volume[2, 5, 3] = 1.0  # the peak
    views = patch_views(np.ones((6, 7, 8)), volume)
    assert [v.title for v in views] == ["axial 2", "coronal 5", "sagittal 3"]
    assert [v.image.shape for v in views] == [(7, 8), (6, 8), (6, 7)]
    assert [v.box for v in views] == [(4, 6, 2, 5), (1, 3, 2, 5), (1, 3, 4, 6)]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_gallery_shows_source_and_nearest_patches_and_writes_pngs(tmp_path, spatial_dims: int) -> None:
    model, data = pushed(spatial_dims)
    nearest = find_nearest_patches(model, push_dataloader(data, batch_size=4), k=2)
    entries = build_gallery(model, data, nearest, class_names=["a", "b", "c"])
    assert [e.prototype for e in entries] == list(range(6)) and entries[2].class_name == "b"
    views = 1 if spatial_dims == 2 else 3
    for entry in entries:
        source = model.prototypes.sources[entry.prototype]
        assert (entry.source.sample_id, entry.source.sample_index) == (source.sample_id, source.sample_index)
        assert len(entry.source.views) == views and len(entry.nearest) == 2
        assert [p.sample_index for p in entry.nearest] == nearest.sample_index[entry.prototype].tolist()
        view = entry.source.views[0]
        r0, r1, c0, c1 = view.box
        peak = np.unravel_index(view.activation.argmax(), view.activation.shape)
        assert r0 <= peak[0] < r1 and c0 <= peak[1] < c1  # the patch box holds the activation peak
        assert view.activation.min() >= 0 and view.activation.max() <= 1
    rgb = overlay_rgb(entries[0].source.views[0])
    assert rgb.dtype == np.uint8 and rgb.shape == (*entries[0].source.views[0].image.shape, 3)
    written = save_gallery(entries[:2], tmp_path)
    assert [p.name for p in written] == ["prototype_000.png", "prototype_001.png", "gallery.png"]
    assert matplotlib.image.imread(written[-1]).ndim == 3


def nearest_with_same_class(same: list[list[bool]]) -> NearestPatches:
    count, k = len(same), len(same[0])
    index = torch.arange(count * k).view(count, k)
    return NearestPatches(distance=torch.rand(count, k).sort(1).values, sample_index=index,
                          feature_index=torch.zeros(count, k, dtype=torch.long), label=torch.zeros(count, k),
                          same_class=torch.tensor(same), ids=[[str(i) for i in row] for row in index.tolist()])


def test_pruning_merges_duplicates_without_changing_logits() -> None:
    model, data = pushed(2)
    with torch.no_grad():  # make prototype 1 a duplicate of prototype 0 (same source patch, same vector)
        model.prototypes.vectors[1] = model.prototypes.vectors[0]
        model.prototypes.sources[1] = replace(model.prototypes.sources[0])
    image = torch.stack([data[i]["image"] for i in range(4)])
    before = model(image, explain=False).logits
    report = PrototypePruning(k=2, min_same_class=0).apply(model, nearest_with_same_class([[True, True]] * 6))
    assert report.duplicates == [(1, 0)] and report.impure == [] and report.active == 5
    torch.testing.assert_close(model(image, explain=False).logits, before, rtol=1e-5, atol=1e-5)
    assert model.prototypes.sources[1].pruned == "duplicate of prototype 0"
    assert float(model.last_layer.weight[:, 1].abs().sum()) == 0.0


def test_pruning_removes_prototypes_whose_nearest_patches_are_other_classes() -> None:
    model, _ = pushed(2)
    same = [[True, True, True], [False, False, True],  # class 0: prototype 1 is impure (1 of 3)
            [False, False, False], [False, True, False],  # class 1: both impure, the last one must stay
            [True, True, False], [True, False, True]]
    pruning = PrototypePruning(k=3, min_same_class=2, remove_duplicates=False)
    report = pruning.apply(model, nearest_with_same_class(same))
    assert report.impure == [1, 2] and report.active == 4
    assert model.prototypes.active.tolist() == [True, False, False, True, True, True]
    assert "1 of its 3 nearest images are of its class" in model.prototypes.sources[1].pruned
    with pytest.raises(ValueError, match=r"expected nearest patches of shape \(6, 4\)"):
        PrototypePruning(k=4).apply(model, nearest_with_same_class(same))
    with pytest.raises(ValueError, match="min_same_class must be in"):
        PrototypePruning(k=3, min_same_class=5)


def test_push_callback_prunes_after_pushing_when_configured(tmp_path) -> None:
    recipe = Recipe(phases=[Phase("last_layer", 1, train=["last_layer"], push=True)],
                    push=PushOptions(pruning=PruningOptions(k=5, min_same_class=5)))
    module = InterpretableModule("protopnet", spatial_dims=2, in_channels=1, num_classes=3, model_kwargs=TINY,
                                 recipe=recipe)
    run = trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    run.fit(module, datamodule=PushData())
    (push,) = [callback for callback in run.callbacks if isinstance(callback, PrototypePush)]
    report = push.reports[0].pruning
    active = module.model.prototypes.active
    assert report is not None and report.active == int(active.sum()) == run.logged_metrics["push/prototypes_active"]
    removed = sorted(report.impure + [duplicate for duplicate, _ in report.duplicates])
    assert removed == (~active).nonzero().flatten().tolist() and len(removed) > 0
    assert all(active.view(3, 2).any(dim=1))  # every class keeps a prototype
