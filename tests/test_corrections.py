"""Prototype corrections (ProtoPDebug forbid and keep losses): the file, the terms, a fine-tune that obeys them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from explain_toys import single_threaded  # noqa: F401 - a fixture, used through pytestmark

from pellucid.models import create_model
from pellucid.models.prototype_corrections import (
    Corrections,
    CorrectionsError,
    read_corrections,
    write_corrections,
)
from pellucid.training.checkpoint import load_checkpoint
from pellucid.training.cli import main
from pellucid.training.data import PhantomDataModule
from pellucid.training.data.augment import BatchAugmentation
from pellucid.training.prototypes.corrections import (
    CorrectionPatches,
    PrototypeCorrections,
    cell_region,
    cell_values,
    correction_terms,
    shuffle_region,
)

pytestmark = pytest.mark.usefixtures("single_threaded")
SOURCE = {"sample_id": "phantom2d-train-000003", "sample_index": 3, "feature_index": [1, 2]}
TINY = ["--data.init_args.num_train=48", "--data.init_args.num_val=16", "--data.init_args.num_test=16",
        "--data.init_args.batch_size=16", "--trainer.enable_progress_bar=false",
        "--trainer.logger=false", "--model.model_kwargs.prototypes_per_class=2",
        "--model.model_kwargs.prototype_channels=8", "--model.model_kwargs.backbone_kwargs.channels=[8,16]",
        "--model.model_kwargs.backbone_kwargs.strides=[2,2]", "--trainer.deterministic=false"]


def test_marks_round_trip_and_a_bad_file_is_one_line_naming_entry_field_and_value(tmp_path: Path) -> None:
    corrections = Corrections("protopnet", "protopnet_phantom2d")
    corrections.set_mark(4, "forbid", SOURCE, "malignant", "marker")
    corrections.set_mark(1, "keep", SOURCE)
    corrections.set_mark(4, "keep", SOURCE, "malignant")  # a new mark replaces the old one
    corrections.set_mark(1, None)  # and None clears it
    path = write_corrections(corrections, tmp_path / "c.yaml")
    again = read_corrections(path, num_prototypes=6, spatial_dims=2)
    assert [(c.prototype, c.mark, c.source, c.class_name) for c in again.corrections] == [(4, "keep", SOURCE,
                                                                                           "malignant")]
    with pytest.raises(CorrectionsError, match="no source patch"):
        corrections.set_mark(2, "forbid", None)
    with pytest.raises(CorrectionsError,
                       match=r"c.yaml, entry 0: field 'prototype': expected an index below 3 .*got 4"):
        read_corrections(path, num_prototypes=3)
    with pytest.raises(CorrectionsError, match=r"entry 0: field 'source.feature_index': expected 3 indices"):
        read_corrections(path, spatial_dims=3)
    path.write_text("model: protopnet\ncorrections:\n  - {prototype: 0, mark: forget, source: {}}\n")
    with pytest.raises(CorrectionsError, match=r"entry 0: field 'mark': expected one of \['forbid', 'keep'\], "
                                               r"got 'forget'"):
        read_corrections(path)
    with pytest.raises(CorrectionsError, match="not found; `pellucid review` writes one"):
        read_corrections(tmp_path / "missing.yaml")


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_cell_values_read_each_samples_own_cell(spatial_dims: int) -> None:
    maps = torch.randn(3, 5, *([4] * spatial_dims))
    cells = torch.randint(0, 4, (3, spatial_dims))
    expected = torch.stack([maps[(f, slice(None), *cells[f].tolist())] for f in range(3)])
    torch.testing.assert_close(cell_values(maps, cells), expected)


def test_the_terms_are_the_largest_activation_at_a_forbidden_patch_and_minus_the_kept_ones_own() -> None:
    torch.manual_seed(0)
    model = create_model("protopnet", 2, in_channels=1, num_classes=2, prototypes_per_class=2, prototype_channels=8,
                         backbone_kwargs={"channels": [8, 16], "strides": [2, 2]}).eval()
    images = torch.rand(3, 1, 16, 16)
    cells = torch.tensor([[0, 1], [2, 3], [1, 1]])
    forbid = CorrectionPatches(images[:2], cells[:2], torch.tensor([0, 3]))
    keep = CorrectionPatches(images[2:], cells[2:], torch.tensor([2]))
    terms = correction_terms(model, forbid, keep)
    maps = model(images, explain=True).prototype_maps
    torch.testing.assert_close(terms["forbid"], torch.stack([maps[0, :, 0, 1].max(), maps[1, :, 2, 3].max()]).mean())
    torch.testing.assert_close(terms["keep"], -maps[2, 2, 1, 1])
    terms["forbid"].backward()
    assert model.prototypes.vectors.grad is not None and model.prototypes.vectors.grad.abs().sum() > 0
    assert correction_terms(model, None, None) == {}


def test_cell_region_is_the_union_of_the_cells_footprints() -> None:
    region = cell_region(torch.tensor([[0, 0], [2, 1]]), (3, 4), (10, 16))
    expected = torch.zeros(10, 16, dtype=torch.bool)
    expected[0:4, 0:4] = True  # row 0 of 3 over 10 pixels: 0..3 (ceil at the far edge)
    expected[6:10, 4:8] = True
    assert torch.equal(region, expected)
    volume = cell_region(torch.tensor([[1, 0, 1]]), (2, 2, 2), (8, 8, 8))
    assert int(volume.sum()) == 64 and bool(volume[4:, :4, 4:].all())


@pytest.mark.parametrize(("spatial_dims", "planes", "places"), [(2, [(0, 1)], 4), (2, [], 4), (3, [(0, 1)], 8)])
def test_the_orbit_of_a_corner_is_every_corner_the_augmentation_can_move_it_to(spatial_dims, planes, places) -> None:
    region = torch.zeros((8,) * spatial_dims, dtype=torch.bool)
    region[(slice(0, 2),) * spatial_dims] = True
    orbit = BatchAugmentation(spatial_dims, planes).orbit(region)
    assert int(orbit.sum()) == places * 2**spatial_dims
    assert bool(orbit[(-1,) * spatial_dims]) and not bool(orbit[(4,) * spatial_dims])
    off_axis = torch.zeros(6, 6, dtype=torch.bool)
    off_axis[0, 1] = True  # a quarter turn reaches (1, 0), which flips alone do not
    assert bool(BatchAugmentation(2, [(0, 1)]).orbit(off_axis)[1, 0])
    assert not bool(BatchAugmentation(2, []).orbit(off_axis)[1, 0])


def test_shuffle_region_swaps_only_the_region_between_images() -> None:
    images = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 2, 8, 8).clone()
    region = torch.zeros(8, 8, dtype=torch.bool)
    region[:2, :3] = True
    donors = shuffle_region(images, region, 1.0, torch.Generator().manual_seed(1))
    assert sorted(donors.tolist()) == list(range(6))  # a permutation of the batch
    for index, donor in enumerate(donors.tolist()):
        assert bool((images[index][:, region] == donor).all())
        assert bool((images[index][:, ~region] == index).all())
    untouched = torch.rand(4, 1, 8, 8)
    copy = untouched.clone()
    assert shuffle_region(untouched, region, 0.0).tolist() == [0, 1, 2, 3] and torch.equal(untouched, copy)


def test_the_callback_shuffles_the_forbidden_places_of_each_training_batch() -> None:
    callback = PrototypeCorrections("unused.yaml", shuffle=1.0)
    callback.region = torch.zeros(8, 8, dtype=torch.bool)
    callback.region[0, 0] = True
    torch.manual_seed(3)
    batch = {"image": torch.arange(16.0).view(16, 1, 1, 1).expand(16, 1, 8, 8).clone()}
    callback.on_train_batch_start(None, None, batch, 0)
    assert sorted(batch["image"][:, 0, 0, 0].tolist()) == list(range(16))
    assert not torch.equal(batch["image"][:, 0, 0, 0], torch.arange(16.0))
    assert torch.equal(batch["image"][:, 0, 1, 1], torch.arange(16.0))
    with pytest.raises(CorrectionsError, match=r"training images are \(4, 4\).*set --corrections_shuffle 0"):
        callback.on_train_batch_start(None, None, {"image": torch.zeros(2, 1, 4, 4)}, 0)
    with pytest.raises(CorrectionsError, match=r"--corrections_shuffle: expected a probability in \[0, 1\], got 2"):
        PrototypeCorrections("unused.yaml", shuffle=2.0)


def fit(tmp_path: Path, name: str, *extra: str) -> Path:
    main(["fit", "--config", "zoo:phantom2d", "--config", "zoo:protopnet", f"--trainer.default_root_dir={name}",
          *TINY, *extra])
    (checkpoint,) = (tmp_path / name).rglob("last.ckpt")
    return checkpoint


def forbidden_activation(checkpoint: Path, source: dict, datamodule: PhantomDataModule) -> float:
    model = load_checkpoint(checkpoint).model.eval()
    image = datamodule.train_dataloader().dataset[source["sample_index"]]["image"]
    with torch.no_grad():
        maps = model(image.unsqueeze(0), explain=True).prototype_maps
    return float(cell_values(maps, torch.tensor([source["feature_index"]])).max())


def test_a_fine_tune_with_a_forbidden_prototype_stops_activating_on_its_patch(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["pellucid"])
    start = fit(tmp_path, "start", "--trainer.max_epochs=1")  # one epoch of the recipe: push + last layer
    module = load_checkpoint(start)
    provenance = module.model.prototype_provenance()
    forbidden = 0
    corrections = Corrections("protopnet", str(start))
    corrections.set_mark(forbidden, "forbid", provenance[forbidden], "normal")
    path = write_corrections(corrections, tmp_path / "corrections.yaml")

    wrong = Corrections("xprotonet", str(start), corrections.corrections)
    with pytest.raises(SystemExit):
        main(["fit", "--config", "zoo:phantom2d", "--config", "zoo:protopnet", "--init_from", str(start),
              "--corrections", str(write_corrections(wrong, tmp_path / "wrong.yaml")), *TINY])
    assert "the file marks prototypes of 'xprotonet', this fit trains 'protopnet'" in capsys.readouterr().err
    assert not (tmp_path / "lightning_logs").exists()  # refused before anything ran

    recipe_off = ["--model.recipe=off", "--trainer.max_epochs=3", "--data.init_args.batch_size=8",  # 18 joint steps:
                  "--model.lr=0.01"]  # no push moves the prototypes
    control = fit(tmp_path, "control", "--init_from", str(start), *recipe_off)
    corrected = fit(tmp_path, "corrected", "--init_from", str(start), "--corrections", str(path),
                    "--model.loss_weights.forbid=20.0", *recipe_off)
    assert "corrections" in capsys.readouterr().out
    datamodule = PhantomDataModule(spatial_dims=2, num_train=48, num_val=16, num_test=16, batch_size=16)
    datamodule.setup("fit")
    source = provenance[forbidden]
    assert forbidden_activation(corrected, source, datamodule) < 0.5 * forbidden_activation(control, source,
                                                                                            datamodule)
