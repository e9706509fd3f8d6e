"""Training augmentation: label-preserving, reproducible, training batches only."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pellucid.training.data import PhantomDataModule
from pellucid.training.data.augment import BatchAugmentation, square_planes


def _batch(spatial_dims: int, size: int = 16, side: int = 8) -> dict:
    shape = (size, 1) + (side,) * spatial_dims
    image = torch.randn(shape)
    ids = [str(i) for i in range(size)]
    return {"image": image, "mask": (image > 0.5).float(), "label": torch.arange(size), "id": ids}


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_augmentation_moves_image_and_mask_together_and_keeps_values(spatial_dims: int) -> None:
    batch = _batch(spatial_dims)
    out = BatchAugmentation(spatial_dims, square_planes((8,) * spatial_dims), seed=3)(batch, epoch=0, batch_index=0)
    assert torch.equal(out["mask"], (out["image"] > 0.5).float())  # the mask followed its image exactly
    changed = [not torch.equal(out["image"][i], batch["image"][i]) for i in range(16)]
    assert sum(changed) >= 8  # most samples moved (identity has probability 1/8 in 2D)
    for i in range(16):  # a permutation of voxels: same sorted values
        assert torch.equal(out["image"][i].flatten().sort().values, batch["image"][i].flatten().sort().values)
    assert out["label"] is batch["label"] and out["id"] == batch["id"]


def test_augmentation_is_reproducible_and_varies_with_epoch_batch_and_rank() -> None:
    batch = _batch(2)
    augment = BatchAugmentation(2, [(0, 1)], seed=0)
    first = augment(batch, 1, 2)["image"]
    assert torch.equal(first, augment(batch, 1, 2)["image"])
    for other in (augment(batch, 2, 2), augment(batch, 1, 3), augment(batch, 1, 2, rank=1)):
        assert not torch.equal(first, other["image"])


def test_augmentation_draws_every_orientation() -> None:
    image = torch.arange(4.0).view(1, 1, 2, 2).expand(64, 1, 2, 2).contiguous()
    out = BatchAugmentation(2, [(0, 1)])({"image": image}, 0, 0)["image"]
    assert len({tuple(o.flatten().tolist()) for o in out}) == 8  # the whole dihedral group of the square


def test_square_planes_skip_axes_of_different_size_or_spacing() -> None:
    assert square_planes((32, 32, 32)) == [(0, 1), (0, 2), (1, 2)]
    assert square_planes((32, 32, 16)) == [(0, 1)]
    assert square_planes((32, 32, 32), (1.0, 1.0, 2.5)) == [(0, 1)]


def test_augmentation_names_the_key_of_a_malformed_tensor() -> None:
    batch = _batch(2)
    batch["mask"] = batch["mask"][:, 0]
    with pytest.raises(ValueError, match=r"batch\['mask'\].*\(B=16, C, \*S\)"):
        BatchAugmentation(2)(batch, 0, 0)
    with pytest.raises(ValueError, match="planes"):
        BatchAugmentation(2, [(0, 2)])


def test_phantom_module_augments_training_batches_only() -> None:
    module = PhantomDataModule(num_train=8, num_val=8, num_test=8, batch_size=8, augment=True)
    batch = next(iter(module.train_dataloader()))
    module.trainer = SimpleNamespace(training=False, current_epoch=0, global_rank=0)
    assert module.on_after_batch_transfer(batch, 0) is batch  # validation, test, predict: untouched
    module.trainer = SimpleNamespace(training=True, current_epoch=0, global_rank=0)
    first = module.on_after_batch_transfer(batch, 0)
    second = module.on_after_batch_transfer(batch, 0)  # the next batch of the epoch draws anew
    assert not torch.equal(first["image"], batch["image"]) and not torch.equal(first["image"], second["image"])
    assert torch.equal(first["concepts"], batch["concepts"]) and torch.equal(first["label"], batch["label"])
    module.trainer = SimpleNamespace(training=True, current_epoch=1, global_rank=0)
    module.on_after_batch_transfer(batch, 0)
    module.trainer = SimpleNamespace(training=True, current_epoch=0, global_rank=0)
    assert torch.equal(module.on_after_batch_transfer(batch, 0)["image"], first["image"])  # epoch restart: same draws
    plain = PhantomDataModule(num_train=8, batch_size=8)
    plain.trainer = SimpleNamespace(training=True, current_epoch=0, global_rank=0)
    assert plain.on_after_batch_transfer(batch, 0) is batch
