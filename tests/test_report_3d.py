"""3D explanations a person can read: the report's slice viewer, 3D prototype galleries and NIfTI maps per family."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from explain_toys import single_threaded  # noqa: F401 - a fixture, used through pytestmark
from torch.utils.data import DataLoader, Dataset

from pellucid.models import create_model, list_models
from pellucid.training import InterpretableModule
from pellucid.training.data import PhantomDataModule
from pellucid.training.elements.families import prototype_gallery
from pellucid.training.elements.localization import evidence_maps
from pellucid.training.elements.results import FiveElementResults
from pellucid.training.outputs.report import write_report
from pellucid.training.outputs.report_evaluation import Example, ModelEvaluation, element_figures
from pellucid.training.outputs.slice_viewer import lesion_centre, slice_caption, slice_viewer_figure
from pellucid.training.outputs.writer import ExplanationWriter, feature_affine
from pellucid.training.outputs.writer_index import read_index
from pellucid.training.prototypes.gallery import activation_maps, build_gallery
from pellucid.training.prototypes.push import push_dataloader, push_prototypes
from pellucid.training.prototypes.sources import find_prototype_sources, keeps_prototype_sources

pytestmark = pytest.mark.usefixtures("single_threaded")

SIZE = 16
FAMILIES = list_models()
TINY_3D = {"spatial_dims": 3, "seed": 0, "image_size": SIZE, "diameter_range_mm": [4.0, 8.0], "num_train": 6,
           "num_val": 2, "num_test": 4, "batch_size": 2, "shortcut": None}
VIEWER = re.compile(r"evidence peak(?: at voxel \(D, H, W\) = \((\d+), (\d+), (\d+)\): axial \1, coronal \2, "
                    r"sagittal \3|: none \(flat or no map\)); lesion centre \(centre of mass of the mask\) at voxel "
                    r"\(D, H, W\) = \((\d+), (\d+), (\d+)\): axial \4, coronal \5, sagittal \6")


def phantom_3d() -> PhantomDataModule:
    return PhantomDataModule(**TINY_3D)


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, 3, in_channels=1, num_classes=3).eval()


def expected_centre(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(round(float(c))) for c in np.argwhere(mask > 0.5).mean(axis=0))


def image_panels(figure) -> list:
    return [axis for axis in figure.axes if axis.images]


# ----------------------------------------------------------------------------------------------- slice viewer
def test_slice_viewer_shows_the_evidence_peak_beside_the_lesion_centre_per_orientation() -> None:
    image = torch.randn(1, SIZE, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, SIZE, SIZE, SIZE)
    mask[0, 2:5, 8:11, 10:13] = 1.0  # centre of mass (3, 9, 11)
    evidence = torch.zeros(SIZE, SIZE, SIZE)
    evidence[12, 4, 5] = 1.0
    evidence[11, 4, 5] = 0.5
    assert lesion_centre(mask) == (3, 9, 11) and lesion_centre(torch.zeros_like(mask)) is None
    caption = slice_caption((12, 4, 5), (3, 9, 11))
    assert VIEWER.search(caption).groups() == ("12", "4", "5", "3", "9", "11")
    figure = slice_viewer_figure(image, evidence, mask, "volume")
    panels = image_panels(figure)
    assert len(panels) == 6  # axial, coronal, sagittal x (evidence peak, lesion centre)
    grey, heat = image[0].numpy(), evidence.numpy()
    for number, axis in enumerate(panels):
        orientation, column = divmod(number, 2)
        index = ((12, 4, 5), (3, 9, 11))[column][orientation]
        assert f"{('axial', 'coronal', 'sagittal')[orientation]} slice {index}" in axis.get_title()
        np.testing.assert_allclose(axis.images[0].get_array(), np.take(grey, index, axis=orientation))
        np.testing.assert_allclose(axis.images[1].get_array(), np.take(heat, index, axis=orientation))
        outlined = any(type(c).__name__ == "QuadContourSet" or "Contour" in type(c).__name__ for c in axis.collections)
        assert outlined == (column == 1)  # the lesion is in the lesion-centre slices, not in the peak's
    assert len(image_panels(slice_viewer_figure(image, evidence, None))) == 3  # no lesion: no lesion column
    assert "evidence peak: none (flat or no map)" in slice_caption(None, (3, 9, 11))
    with pytest.raises(ValueError, match=r"expected a \(C, D, H, W\) volume, got image of shape \(1, 16, 16\)"):
        slice_viewer_figure(torch.zeros(1, SIZE, SIZE))


@pytest.fixture(scope="module")
def phantom_batch() -> dict:
    data = phantom_3d()
    data.setup("test")
    return next(iter(data.test_dataloader()))


@pytest.mark.parametrize("name", FAMILIES)
def test_every_3d_family_gets_a_slice_viewer_at_its_evidence_peak_and_lesion_centre(name: str, phantom_batch) -> None:
    model = build(name)
    with torch.no_grad():
        output = model(phantom_batch["image"], explain=True)
    examples = [Example(phantom_batch["id"][i], {k: phantom_batch[k][i] for k in ("image", "mask", "label")},
                        output.apply(lambda t, i=i: t[i:i + 1])) for i in range(len(phantom_batch["id"]))]
    examples = [e for e in examples if e.inputs["mask"].max() > 0]
    assert examples, "the tiny 3D phantom has lesions in its test split"
    evaluation = ModelEvaluation(name=name, checkpoint="", task_metrics={}, results=FiveElementResults(),
                                 sanity=None, examples=examples, class_names=["normal", "benign", "malignant"])
    viewers = [(caption, png) for caption, png in element_figures(evaluation, count=len(examples))["localization"]
               if "slice viewer" in caption]
    assert len(viewers) == len(examples)
    for example, (caption, png) in zip(examples, viewers, strict=True):
        assert caption.startswith(example.sample_id) and png.startswith(b"\x89PNG")
        evidence = evidence_maps(example.output)[0].numpy()
        found = VIEWER.search(caption)
        assert found is not None, caption
        if evidence.max() > evidence.min():
            peak = np.unravel_index(int(evidence.argmax()), evidence.shape)
            assert tuple(int(g) for g in found.groups()[:3]) == tuple(int(i) for i in peak)
        else:  # an untrained model's flat map has no peak, and the caption says so
            assert found.groups()[:3] == (None, None, None)
        assert tuple(int(g) for g in found.groups()[3:]) == expected_centre(example.inputs["mask"][0].numpy())


def test_the_3d_report_card_embeds_the_slice_viewer(tmp_path: Path) -> None:
    data = phantom_3d()
    torch.manual_seed(0)
    module = InterpretableModule("blackbox", spatial_dims=3, in_channels=1, num_classes=3, task=data.task,
                                 class_names=data.class_names, concepts=data.concept_specs)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "blackbox.ckpt")
    paths = write_report(tmp_path / "blackbox.ckpt", data, tmp_path / "report", sanity_samples=0, deletion_samples=2,
                         examples=2)
    report = json.loads(paths.json.read_text())
    viewers = [f for f in report["elements"]["localization"]["figures"]["model"] if "slice viewer" in f["caption"]]
    assert len(viewers) == 2 and all(VIEWER.search(f["caption"]) for f in viewers)
    assert all((tmp_path / "report" / f["file"]).read_bytes().startswith(b"\x89PNG") for f in viewers)
    assert all(f["caption"] in paths.html.read_text() for f in viewers)


# -------------------------------------------------------------------------------------------- 3D galleries
PROTOTYPE_FAMILIES = [name for name in FAMILIES if build(name).prototype_provenance() is not None]


def test_the_prototype_families_are_the_ones_the_issue_names() -> None:
    assert {"protopnet", "protopnet_cosine", "xprotonet", "pipnet"} <= set(PROTOTYPE_FAMILIES)


@pytest.mark.parametrize("name", PROTOTYPE_FAMILIES)
def test_3d_gallery_cuts_three_orthogonal_slices_through_each_source_patch(name: str) -> None:
    data = phantom_3d()
    data.setup("fit")
    dataset = data.train_dataloader().dataset
    model = build(name)
    loader = push_dataloader(dataset, batch_size=3)
    with torch.no_grad():
        if keeps_prototype_sources(model):  # PIP-Net: sources found, prototypes unchanged
            model.record_prototype_sources([None if s is None else s.to_dict()
                                            for s in find_prototype_sources(model, loader).sources])
        else:
            push_prototypes(model, loader)
    provenance = model.prototype_provenance()
    entries = [e for e in build_gallery(model, dataset) if e.source is not None]
    assert entries, f"{name}: no prototype got a source"
    for entry in entries:
        source = provenance[entry.prototype]
        centre = source["image_center"]
        point = [int(np.clip(round(c), 0, SIZE - 1)) for c in centre]
        volume = dataset[source["sample_index"]]["image"][0].numpy()
        views = entry.source.views
        assert [v.title for v in views] == [f"axial {point[0]}", f"coronal {point[1]}", f"sagittal {point[2]}"]
        for axis, view in enumerate(views):
            np.testing.assert_allclose(view.image, np.take(volume, point[axis], axis=axis))
            assert view.marker == tuple(float(centre[a]) for a in range(3) if a != axis)
            assert view.activation.shape == view.image.shape
            assert 0 <= view.activation.min() <= view.activation.max() <= 1
        if name.startswith("protopnet"):  # push copied the patch: the prototype is most similar on its own footprint
            activation = activation_maps(model, dataset[source["sample_index"]]["image"])[entry.prototype]
            peak = np.unravel_index(int(activation.argmax()), activation.shape)
            assert all(start <= i < stop for i, (start, stop) in zip(peak, source["image_box"], strict=True))
    figure = prototype_gallery(model, lambda: dataset, ["normal", "benign", "malignant"])
    assert figure is not None
    titles = [axis.get_title() for axis in figure.axes if axis.images]
    assert any("axial" in t for t in titles) and any("sagittal" in t for t in titles)


# -------------------------------------------------------------------------------------------------- NIfTI
class _Volumes(Dataset):
    """Two 16^3 volumes with their own (anisotropic, shifted) voxel-to-world affine."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(index)
        affine = torch.diag(torch.tensor([1.5 * (index + 1), 2.0, 3.0, 1.0], dtype=torch.float64))
        affine[:3, 3] = torch.tensor([-10.0, 5.0 * index, 2.0], dtype=torch.float64)
        return {"image": torch.randn(1, SIZE, SIZE, SIZE, generator=generator), "label": torch.tensor(index),
                "affine": affine, "id": f"volume-{index}"}


class _NoAffine(_Volumes):
    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        item.pop("affine")
        return item


class _Predict(pl.LightningDataModule):
    def __init__(self, dataset: Dataset) -> None:
        super().__init__()
        self.dataset = dataset

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=2)


def predict_nifti(name: str, folder: Path, dataset: Dataset, nifti: str) -> None:
    torch.manual_seed(0)
    module = InterpretableModule(name, spatial_dims=3, in_channels=1, num_classes=3,
                                 task="segmentation" if build(name)(torch.zeros(1, 1, SIZE, SIZE, SIZE)).logits is None
                                 else "multiclass")
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=folder,
                         callbacks=[ExplanationWriter(folder, nifti=nifti)])
    trainer.predict(module, datamodule=_Predict(dataset), return_predictions=False)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_3d_map_of_every_family_is_written_as_nifti_matching_its_npz(name: str, tmp_path: Path) -> None:
    for dataset, nifti in ((_Volumes(), "auto"), (_NoAffine(), "always")):
        out = tmp_path / nifti
        predict_nifti(name, out, dataset, nifti)
        for row in sorted(read_index(out), key=lambda r: r["id"]):
            index = int(row["id"].split("-")[1])
            affine = dataset[index]["affine"].numpy() if "affine" in dataset[index] else np.eye(4)
            written = set(row["nifti"].split(";"))
            with np.load(out / row["file"]) as arrays:
                volumes = {key: arrays[key] for key in arrays.files if arrays[key].ndim == 4}  # (C, i, j, k) maps
            assert "localization" in volumes
            assert written == {f"{row['id']}.{key}.nii.gz" for key in volumes}
            for key, maps in volumes.items():
                saved = nibabel.load(out / f"{row['id']}.{key}.nii.gz")
                data = np.asarray(saved.dataobj)
                data = data[None] if data.ndim == 3 else np.moveaxis(data, -1, 0)
                assert data.shape == maps.shape
                np.testing.assert_array_equal(data, maps.astype(np.float32))
                grid = maps.shape[1:]
                expected = affine if grid == (SIZE,) * 3 else feature_affine(affine, (SIZE,) * 3, grid)
                np.testing.assert_allclose(saved.affine, expected, atol=1e-6)
