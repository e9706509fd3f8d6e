"""Tests of the phantom benchmark: determinism, ground truth, label rule, shortcut, 3D/anisotropy, data module."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pellucid.models.concepts import ConceptSpec
from pellucid.training.data.phantom import (
    LABEL_RULE,
    LESION_TYPE_NAMES,
    PHANTOM_CLASSES,
    PHANTOM_CONCEPTS,
    PhantomConfig,
    PhantomGenerator,
    PhantomSample,
    lesion_type_from_concepts,
)
from pellucid.training.data.phantom_datamodule import PhantomDataModule, PhantomDataset

TISSUE_BASE = 0.4  # documented base intensity of the tissue


def _samples(generator: PhantomGenerator, count: int, split: str = "train") -> list[PhantomSample]:
    return [generator.sample(split, index) for index in range(count)]


@pytest.fixture(scope="module")
def samples_2d() -> list[PhantomSample]:
    return _samples(PhantomGenerator(PhantomConfig(spatial_dims=2), seed=0), 600)


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_same_seed_gives_same_bytes_and_other_seed_differs(spatial_dims: int) -> None:
    config = PhantomConfig(spatial_dims=spatial_dims, shortcut={"train": 0.9})
    first, again = PhantomGenerator(config, seed=7), PhantomGenerator(config, seed=7)
    other = PhantomGenerator(config, seed=8)
    for index in range(5):
        a, b, c = first.sample("train", index), again.sample("train", index), other.sample("train", index)
        assert a.image.tobytes() == b.image.tobytes()
        assert a.mask.tobytes() == b.mask.tobytes()
        assert a.concepts.tobytes() == b.concepts.tobytes() and a.label == b.label and a.id == b.id
        assert a.image.tobytes() != c.image.tobytes()
    # different splits and different indices are different scans
    assert first.sample("train", 0).image.tobytes() != first.sample("val", 0).image.tobytes()
    assert first.sample("train", 0).image.tobytes() != first.sample("train", 1).image.tobytes()


def test_random_access_order_does_not_matter() -> None:
    config = PhantomConfig()
    in_order = PhantomGenerator(config, seed=3)
    reference = {index: in_order.sample("test", index).image.tobytes() for index in range(6)}
    shuffled = PhantomGenerator(config, seed=3)
    for index in [5, 2, 2, 0, 4, 1, 3]:
        assert shuffled.sample("test", index).image.tobytes() == reference[index]


def test_dataloader_workers_and_batching_do_not_change_samples() -> None:
    generator = PhantomGenerator(PhantomConfig(), seed=5)
    dataset = PhantomDataset(generator, "val", 6)
    batches = list(torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2))
    images = torch.cat([batch["image"] for batch in batches])
    for index in range(6):
        assert images[index].numpy().tobytes() == generator.sample("val", index).image.tobytes()


# ---------------------------------------------------------------- ground truth


def test_samples_have_documented_shapes_and_dtypes(samples_2d: list[PhantomSample]) -> None:
    sample = samples_2d[0]
    assert sample.image.shape == sample.mask.shape == (1, 64, 64)
    assert sample.image.dtype == sample.mask.dtype == sample.concepts.dtype == np.float32
    assert sample.concepts.shape == (5,)
    assert sample.id == "phantom2d-train-000000"
    assert sample.confounder_mask is None and not sample.shortcut_present
    assert set(np.unique(sample.mask)) <= {0.0, 1.0}
    assert all(-0.5 < s.image.min() and s.image.max() < 3.0 for s in samples_2d[:50])


def test_mask_is_non_empty_exactly_when_there_is_a_lesion(samples_2d: list[PhantomSample]) -> None:
    for sample in samples_2d[:200]:
        has_lesion = sample.concepts[0] > 0
        assert bool(sample.mask.any()) == has_lesion == (sample.label > 0) == (sample.lesion_type > 0)
        if not has_lesion:
            assert not sample.concepts.any()
        assert not (sample.mask.astype(bool) & ~sample.body_mask).any(), "lesions lie inside the body"


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    grown = mask.copy()
    for _ in range(steps):
        padded = np.pad(grown, 1)
        grown = grown | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    return grown


def test_lesions_are_brighter_than_the_surrounding_tissue(samples_2d: list[PhantomSample]) -> None:
    for sample in [s for s in samples_2d[:200] if s.lesion_type]:
        inside = sample.mask[0].astype(bool)
        tissue = _dilate(inside, 3) & ~inside & sample.body_mask[0]  # a 3-pixel ring around the lesion
        difference = sample.image[0][inside].mean() - sample.image[0][tissue].mean()
        assert difference > 0.5 * sample.concepts[1], sample.id  # contrast >= 0.3 is added inside the lesion


def test_round_lesion_mask_matches_the_diameter_concept(samples_2d: list[PhantomSample]) -> None:
    # Round, non-spiculated lesions: area-equivalent diameter within one pixel (1 mm) of diameter_mm.
    round_lesions = [s for s in samples_2d if s.lesion_type and not s.concepts[2] and not s.concepts[3]]
    assert len(round_lesions) > 50
    for sample in round_lesions:
        equivalent_diameter = 2 * np.sqrt(sample.mask.sum() / np.pi)
        assert abs(equivalent_diameter - sample.concepts[0]) < 1.0, sample.id


def test_irregular_and_spiculated_lesions_have_longer_outlines(samples_2d: list[PhantomSample]) -> None:
    def perimeter_ratio(sample: PhantomSample) -> float:  # boundary pixels / circle of the same area
        inside = sample.mask[0].astype(bool)
        interior = inside[1:-1, 1:-1] & inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:]
        return (inside.sum() - interior.sum()) / (2 * np.sqrt(np.pi * inside.sum()))

    large = [s for s in samples_2d if s.concepts[0] >= 12]
    round_ratio = np.mean([perimeter_ratio(s) for s in large if s.lesion_type in (1, 5)])
    spiculated_ratio = np.mean([perimeter_ratio(s) for s in large if s.concepts[3]])
    irregular_ratio = np.mean([perimeter_ratio(s) for s in large if s.lesion_type in (2, 6)])
    assert spiculated_ratio > 1.3 * round_ratio
    assert irregular_ratio > 1.05 * round_ratio


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_calcified_lesions_have_bright_dots_inside_the_mask(spatial_dims: int) -> None:
    generator = PhantomGenerator(PhantomConfig(spatial_dims=spatial_dims), seed=1)
    checked = {0.0: 0, 1.0: 0}
    for sample in _samples(generator, 150):
        if not sample.lesion_type:
            continue
        lesion_level = TISSUE_BASE + sample.concepts[1]
        bright = sample.image[sample.mask.astype(bool)] > lesion_level + 0.65  # dots add 0.8-1.0
        assert bool(bright.any()) == bool(sample.concepts[4]), sample.id
        checked[float(sample.concepts[4])] += 1
    assert min(checked.values()) > 10


def test_labels_follow_the_label_rule(samples_2d: list[PhantomSample]) -> None:
    concepts = np.stack([s.concepts for s in samples_2d])
    labels = np.array([s.label for s in samples_2d])
    np.testing.assert_array_equal(labels, LABEL_RULE.label_from_concepts(concepts))
    torch_labels = LABEL_RULE.label_from_concepts(torch.from_numpy(concepts))
    assert torch_labels.dtype == torch.long
    np.testing.assert_array_equal(torch_labels.numpy(), labels)


def test_label_rule_on_hand_written_cases() -> None:
    # columns: diameter_mm, contrast, irregular, spiculated, calcified
    cases = {
        (0.0, 0.0, 0, 0, 0): 0,  # no lesion -> normal
        (5.0, 0.5, 0, 0, 0): 1,  # small round: 0 points -> benign
        (12.0, 0.5, 1, 0, 0): 2,  # large + irregular: 2 points -> malignant
        (12.0, 0.5, 1, 0, 1): 1,  # ... but calcified: 1 point -> benign
        (5.0, 0.5, 0, 1, 0): 2,  # spiculated: 2 points -> malignant
        (5.0, 0.5, 0, 1, 1): 1,  # spiculated and calcified: 1 point -> benign
        (10.0, 0.5, 0, 1, 1): 2,  # exactly 10 mm counts as large: 2 points
        (9.9, 0.5, 1, 0, 0): 1,
    }
    concepts = np.array(list(cases), dtype=np.float32)
    np.testing.assert_array_equal(LABEL_RULE.label_from_concepts(concepts), list(cases.values()))
    np.testing.assert_allclose(LABEL_RULE.points(concepts[:3]), [0.0, 0.0, 2.0])
    assert "2*spiculated" in LABEL_RULE.describe() and "malignant" in LABEL_RULE.describe()


def test_lesion_type_formula(samples_2d: list[PhantomSample]) -> None:
    for sample in samples_2d[:200]:
        diameter, _, irregular, spiculated, calcified = sample.concepts.tolist()
        expected = 0 if diameter == 0 else int(1 + irregular + 2 * spiculated + 4 * calcified)
        assert sample.lesion_type == expected
        assert LESION_TYPE_NAMES[expected].startswith("irregular") == (expected > 0 and irregular == 1)
    assert lesion_type_from_concepts(torch.tensor([[8.0, 0.5, 1, 1, 1]])).tolist() == [8]
    assert len({s.lesion_type for s in samples_2d}) == 9


def test_label_distribution_is_roughly_balanced(samples_2d: list[PhantomSample]) -> None:
    counts = np.bincount([s.label for s in samples_2d], minlength=3) / len(samples_2d)
    assert counts.min() > 0.25 and counts.max() < 0.42, counts


def test_several_lesions_label_follows_the_index_lesion() -> None:
    generator = PhantomGenerator(PhantomConfig(max_lesions=3), seed=2)
    multiple = 0
    for sample in _samples(generator, 80):
        if len(sample.lesion_concepts) > 1:
            multiple += 1
            np.testing.assert_array_equal(sample.concepts, sample.lesion_concepts[0])
            per_lesion = LABEL_RULE.label_from_concepts(sample.lesion_concepts)
            assert sample.label == per_lesion.max()
            assert (LABEL_RULE.points(sample.lesion_concepts) <= LABEL_RULE.points(sample.concepts)).all()
    assert multiple > 10


# ---------------------------------------------------------------- shortcut


def test_shortcut_marker_rate_follows_the_configured_correlation_per_split() -> None:
    strengths = {"train": 0.9, "val": 0.5, "test": 0.1}
    generator = PhantomGenerator(PhantomConfig(shortcut=strengths), seed=0)
    for split, strength in strengths.items():
        samples = _samples(generator, 400, split)
        malignant = np.array([s.label == 2 for s in samples])
        present = np.array([s.shortcut_present for s in samples])
        assert abs(present[malignant].mean() - strength) < 0.1, split
        assert abs(present[~malignant].mean() - (1 - strength)) < 0.1, split


def test_confounder_mask_marks_the_marker_outside_body_and_lesion() -> None:
    generator = PhantomGenerator(PhantomConfig(shortcut={"train": 0.9}), seed=4)
    seen_marker = 0
    for sample in _samples(generator, 60):
        marker = sample.confounder_mask.astype(bool)
        assert sample.confounder_mask.shape == sample.image.shape and sample.confounder_mask.dtype == np.float32
        assert marker.any() == sample.shortcut_present
        assert not (marker & sample.mask.astype(bool)).any() and not (marker & sample.body_mask).any()
        if sample.shortcut_present:
            seen_marker += 1
            assert sample.image[marker].mean() > 1.0  # the bright tag is in the image, on black background
    assert seen_marker > 10


def test_enabling_the_shortcut_changes_only_the_marker() -> None:
    plain = PhantomGenerator(PhantomConfig(), seed=9)
    marked = PhantomGenerator(PhantomConfig(shortcut={"train": 1.0}), seed=9)
    for index in range(20):
        a, b = plain.sample("train", index), marked.sample("train", index)
        outside = ~b.confounder_mask.astype(bool)
        assert a.image[outside].tobytes() == b.image[outside].tobytes()
        assert a.label == b.label and a.mask.tobytes() == b.mask.tobytes()


# ---------------------------------------------------------------- 3D and anisotropic spacing


@pytest.mark.parametrize(
    ("spatial_dims", "image_size", "spacing_mm"),
    [(2, (40, 64), (1.5, 0.75)), (3, (24, 32, 40), (2.0, 1.5, 1.2))],
)
def test_anisotropic_lesions_are_round_in_millimetres(
    spatial_dims: int, image_size: tuple[int, ...], spacing_mm: tuple[float, ...]
) -> None:
    config = PhantomConfig(spatial_dims, image_size, spacing_mm, diameter_range_mm=(8.0, 14.0))
    generator = PhantomGenerator(config, seed=0)
    checked = 0
    for sample in _samples(generator, 60):
        assert sample.image.shape == (1, *image_size)
        if not sample.lesion_type or sample.concepts[2] or sample.concepts[3]:
            continue
        checked += 1
        inside = np.argwhere(sample.mask[0] > 0)
        extent_mm = (inside.max(axis=0) - inside.min(axis=0) + 1) * np.asarray(spacing_mm)
        assert (np.abs(extent_mm - sample.concepts[0]) <= np.asarray(spacing_mm) + 1e-3).all(), (sample.id, extent_mm)
        voxel_volume = np.prod(spacing_mm)
        ball = np.pi / 6 * sample.concepts[0] ** 3 if spatial_dims == 3 else np.pi / 4 * sample.concepts[0] ** 2
        assert abs(sample.mask.sum() * voxel_volume / ball - 1) < 0.2
    assert checked >= 5


def test_3d_defaults() -> None:
    sample = PhantomGenerator(PhantomConfig(spatial_dims=3), seed=0).sample("val", 3)
    assert sample.image.shape == (1, 32, 32, 32) and sample.id == "phantom3d-val-000003"
    assert PhantomConfig(spatial_dims=3).spacing_mm == (2.0, 2.0, 2.0)


# ---------------------------------------------------------------- argument validation


@pytest.mark.parametrize(
    ("arguments", "named", "actual"),
    [
        ({"spatial_dims": 4}, "spatial_dims", "4"),
        ({"image_size": 8}, "image_size", "8"),
        ({"image_size": (64, 64, 64)}, "image_size", "(64, 64, 64)"),
        ({"spacing_mm": -1.0}, "spacing_mm", "-1.0"),
        ({"diameter_range_mm": (10.0, 5.0)}, "diameter_range_mm", "(10.0, 5.0)"),
        ({"diameter_range_mm": (0.0, 5.0)}, "diameter_range_mm", "(0.0, 5.0)"),
        ({"image_size": 40}, "image_size", "40"),  # too small for a 20 mm lesion at 1 mm
        ({"p_normal": 1.5}, "p_normal", "1.5"),
        ({"max_lesions": 0}, "max_lesions", "0"),
        ({"noise_std": -0.1}, "noise_std", "-0.1"),
        ({"shortcut": {"train": 1.5}}, "shortcut", "1.5"),
        ({"shortcut": {"training": 0.9}}, "shortcut", "training"),
    ],
)
def test_invalid_config_raises_naming_argument_and_value(arguments: dict, named: str, actual: str) -> None:
    with pytest.raises(ValueError) as error:
        PhantomConfig(**arguments)
    assert named in str(error.value) and actual in str(error.value)


def test_invalid_generator_and_data_module_arguments() -> None:
    with pytest.raises(ValueError, match="seed.*-1"):
        PhantomGenerator(seed=-1)
    with pytest.raises(ValueError, match="split.*'training'"):
        PhantomGenerator().sample("training", 0)
    with pytest.raises(ValueError, match="num_train.*-5"):
        PhantomDataModule(num_train=-5)
    with pytest.raises(ValueError, match="spatial_dims.*1"):
        PhantomDataModule(spatial_dims=1)


# ---------------------------------------------------------------- data module


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_data_module_batches_follow_the_batch_convention(spatial_dims: int) -> None:
    module = PhantomDataModule(
        spatial_dims, num_train=6, num_val=5, num_test=4, batch_size=4, shortcut={"train": 0.9, "test": 0.5}
    )
    assert (module.spatial_dims, module.in_channels, module.num_classes, module.task) == (
        spatial_dims,
        1,
        3,
        "multiclass",
    )
    assert module.class_names == PHANTOM_CLASSES and module.num_concepts == 5
    assert all(isinstance(spec, ConceptSpec) for spec in module.concept_specs)
    assert [spec.name for spec in module.concept_specs] == [spec.name for spec in PHANTOM_CONCEPTS]
    assert module.label_rule is LABEL_RULE and module.phantom_config.spatial_dims == spatial_dims
    size = (64, 64) if spatial_dims == 2 else (32, 32, 32)
    loaders = {
        "train": module.train_dataloader(),
        "val": module.val_dataloader(),
        "test": module.test_dataloader(),
        "predict": module.predict_dataloader(),
    }
    assert len(loaders["predict"].dataset) == 4  # num_predict defaults to num_test
    for split, loader in loaders.items():
        batch = next(iter(loader))
        assert set(batch) == {
            "image",
            "label",
            "mask",
            "concepts",
            "lesion_type",
            "id",
            "confounder_mask",
            "shortcut_present",
        }
        assert batch["image"].shape == batch["mask"].shape == batch["confounder_mask"].shape == (4, 1, *size)
        assert batch["image"].dtype == batch["mask"].dtype == batch["concepts"].dtype == torch.float32
        assert batch["label"].shape == batch["lesion_type"].shape == (4,)
        assert batch["label"].dtype == batch["lesion_type"].dtype == torch.long
        assert batch["concepts"].shape == (4, 5) and len(batch["id"]) == 4
        assert all(identifier.startswith(f"phantom{spatial_dims}d-{split}-") for identifier in batch["id"])
    assert next(iter(loaders["val"]))["id"][0] == f"phantom{spatial_dims}d-val-000000"


def test_data_module_without_shortcut_and_seeded_shuffle() -> None:
    first, second = (
        PhantomDataModule(seed=3, num_train=16, batch_size=8),
        PhantomDataModule(seed=3, num_train=16, batch_size=8),
    )
    batch = next(iter(first.train_dataloader()))
    assert "confounder_mask" not in batch and "shortcut_present" not in batch
    assert batch["id"] == next(iter(second.train_dataloader()))["id"]
    assert batch["id"] != sorted(batch["id"])  # shuffled


def test_dataset_cache_returns_stored_items() -> None:
    dataset = PhantomDataset(PhantomGenerator(), "train", 3, cache=True)
    assert dataset[1] is dataset[1] and dataset[-1]["id"] == "phantom2d-train-000002"
    with pytest.raises(IndexError):
        dataset[3]


def test_data_module_is_configurable_from_plain_yaml_values() -> None:
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(PhantomDataModule, "data")
    config = parser.parse_object(
        {
            "data": {
                "spatial_dims": 3,
                "image_size": [24, 32, 32],
                "spacing_mm": [2.0, 1.5, 1.5],
                "diameter_range_mm": [4, 12],
                "shortcut": {"train": 0.9, "val": 0.5},
            }
        }
    )
    module = parser.instantiate_classes(config)["data"]
    assert module.phantom_config.image_size == (24, 32, 32)
    assert module.phantom_config.diameter_range_mm == (4.0, 12.0)
    assert module.hparams["shortcut"] == {"train": 0.9, "val": 0.5}
