"""Post-hoc baselines (Grad-CAM, occlusion, integrated gradients) and localization by lesion size, 2D and 3D."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from explain_toys import single_threaded  # noqa: F401 - a fixture, used through pytestmark
from torch import Tensor, nn

from pellucid.models import InterpretableModel, ModelOutput, create_model
from pellucid.training import InterpretableModule
from pellucid.training.elements.localization import LocalizationBySize
from pellucid.training.elements.posthoc import (
    LogitsOnly,
    grad_cam_layer,
    integrated_gradient_maps,
    occlusion_maps,
    posthoc_maps,
)
from pellucid.training.outputs.report import load_datamodule, write_report
from pellucid.training.outputs.report_evaluation import element_figures, evaluate_checkpoint

pytestmark = pytest.mark.usefixtures("single_threaded")
SIZES = {2: (16, 16), 3: (16, 16, 16)}


class RegionReader(InterpretableModel):
    """Class 1's logit is the mean intensity of one known box (the corner ``[:4, :4]``); class 0's is its negative."""

    def __init__(self, spatial_dims: int) -> None:
        super().__init__(spatial_dims, 1, 2)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, image: Tensor, *, explain: bool = True) -> ModelOutput:
        box = image[(slice(None), 0, *([slice(0, 4)] * self.spatial_dims))]
        read = box.flatten(1).mean(dim=1, keepdim=True) * self.scale
        return ModelOutput(logits=torch.cat([-read, read], dim=1))

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"head": [self.scale]}


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_posthoc_grad_cam_of_the_black_box_is_its_own_grad_cam(spatial_dims: int) -> None:
    torch.manual_seed(0)
    model = create_model("blackbox", spatial_dims, in_channels=1, num_classes=3).eval()
    image = torch.randn(2, 1, *SIZES[spatial_dims])
    with torch.no_grad():
        output = model(image)
    classes = output.logits.argmax(dim=1)
    assert grad_cam_layer(model, image) == "feature_map"  # found by running the model, no attribute name guessed
    maps = posthoc_maps(model, image, classes)
    assert set(maps) == {"grad_cam", "occlusion", "integrated_gradients"}
    own = output.localization[torch.arange(2), classes]
    torch.testing.assert_close(maps["grad_cam"], own, atol=1e-5, rtol=0)
    for method, found in maps.items():
        assert found.shape == (2, *SIZES[spatial_dims]), method
        assert float(found.min()) >= 0.0 and float(found.max()) == pytest.approx(1.0), method
    assert model.training is False and not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_occlusion_and_integrated_gradients_find_the_region_the_logit_reads(spatial_dims: int) -> None:
    model = RegionReader(spatial_dims).eval()
    inside = torch.zeros(SIZES[spatial_dims], dtype=torch.bool)
    inside[(slice(0, 4),) * spatial_dims] = True
    image = 0.1 * torch.rand(2, 1, *SIZES[spatial_dims]) + inside  # a bright box: hiding it lowers class 1's logit
    classes = torch.tensor([1, 1])
    occlusion = occlusion_maps(model, image, classes, windows=4)  # windows of 4: one window is exactly the box
    assert bool((occlusion[:, inside] == 1).all()) and bool((occlusion[:, ~inside] == 0).all())
    gradients = integrated_gradient_maps(model, image, classes, steps=8)
    # a linear logit: the attribution is (image - baseline) * weight inside the box and exactly 0 outside
    assert bool((gradients[:, ~inside] == 0).all()) and bool((gradients[:, inside] > 0).any())
    baseline = image.mean(dim=tuple(range(1, image.ndim)), keepdim=True)
    expected = (image - baseline).abs()[:, 0] * inside
    expected = expected / expected.flatten(1).amax(dim=1).view(-1, *([1] * spatial_dims))
    torch.testing.assert_close(gradients, expected, atol=1e-4, rtol=0)


def test_a_model_without_logits_is_named() -> None:
    model = create_model("attention_unet", 2, in_channels=1, num_classes=2).eval()
    with pytest.raises(ValueError, match=r"LogitsOnly: attention_unet returns no logits"):
        LogitsOnly(model)(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"unknown methods \['lime'\]; known: \['grad_cam'"):
        posthoc_maps(RegionReader(2), torch.zeros(1, 1, 16, 16), torch.tensor([1]), ["lime"])


def test_localization_by_size_bins_each_sample_by_its_diameter() -> None:
    maps = torch.zeros(5, 8, 8)
    mask = torch.zeros(5, 1, 8, 8)
    mask[:, :, 2:4, 2:4] = 1
    maps[:, 2, 2] = 1.0  # peaks inside the lesion ...
    maps[1] = 0.0
    maps[1, 7, 7] = 1.0  # ... except sample 1, whose peak (its only mass) lies outside
    maps[4] = 0.5  # a constant map: left out of the pointing game, no mass inside beyond the mask's share
    diameters = torch.tensor([5.0, 7.9, 12.0, 20.0, 9.0])  # bins 4-8, 4-8, 12-16, 16-20 (upper end kept), 8-12
    metric = LocalizationBySize()
    metric.update(maps, mask, diameters)
    metric.update(maps[:1], mask[:1], torch.tensor([float("nan")]))  # no annotation: left out
    values = metric.compute()
    assert values["pointing_game"] == {"4-8mm": 0.5, "8-12mm": None, "12-16mm": 1.0, "16-20mm": 1.0}
    assert values["energy_inside_mask"] == {"4-8mm": 0.5, "8-12mm": pytest.approx(4 / 64), "12-16mm": 1.0,
                                            "16-20mm": 1.0}
    with pytest.raises(ValueError, match=r"every bin needs low < high, got \[\(8.0, 4.0\)\]"):
        LocalizationBySize([(8.0, 4.0)])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_the_report_sets_post_hoc_maps_beside_the_built_in_one_and_splits_localization_by_size(
        spatial_dims: int, tmp_path: Path) -> None:
    size = 32 if spatial_dims == 2 else 16
    init_args = {"spatial_dims": spatial_dims, "seed": 0, "image_size": size, "diameter_range_mm": [4.0, 9.0],
                 "num_train": 4, "num_val": 4, "num_test": 6, "batch_size": 6, "shortcut": None}
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump({"data": {"class_path": "pellucid.training.data.PhantomDataModule",
                                             "init_args": init_args}}))
    torch.manual_seed(0)
    module = InterpretableModule("protopnet", spatial_dims=spatial_dims, in_channels=1, num_classes=3)
    evaluation = evaluate_checkpoint(module, load_datamodule(data), name="model", sanity_samples=6,
                                     deletion_samples=0, posthoc_samples=3)
    rows = {m.name: m.value for m in evaluation.results.metrics}
    for explainer in ("built_in", "grad_cam", "occlusion", "integrated_gradients"):
        assert 0.0 <= rows[f"posthoc_energy_inside_mask/{explainer}"] <= 1.0, explainer
        assert rows[f"posthoc_pointing_game/{explainer}"] in (0.0, 1 / 3, 2 / 3, 1.0), explainer
    posthoc = evaluation.posthoc
    assert len(posthoc.sample_ids) == 3 and posthoc.images.shape[0] == 3
    torch.testing.assert_close(posthoc.maps["built_in"][0], evaluation.examples[0].output.localization[
        0, int(evaluation.examples[0].output.logits.argmax())])  # the model's own map of the same image
    assert any("post-hoc comparison on 3 images" in note for note in evaluation.results.notes["localization"])
    assert rows["pointing_game_by_diameter/16-20mm"] is None  # no lesion that large in this data
    assert rows["energy_inside_mask_by_diameter/4-8mm"] is not None
    captions = [caption for caption, _ in element_figures(evaluation, 2)["localization"]]
    assert sum("built-in vs post-hoc" in caption for caption in captions) == 2
    assert len(evaluation.sanity.original_maps) == 6  # the randomisation check runs on every image asked for


def test_the_report_json_carries_the_post_hoc_rows_and_can_leave_them_out(tmp_path: Path) -> None:
    init_args = {"spatial_dims": 2, "seed": 0, "image_size": 32, "diameter_range_mm": [4.0, 8.0], "num_train": 4,
                 "num_val": 4, "num_test": 4, "batch_size": 4, "shortcut": None}
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump({"data": {"class_path": "pellucid.training.data.PhantomDataModule",
                                             "init_args": init_args}}))

    torch.manual_seed(0)
    module = InterpretableModule("blackbox", spatial_dims=2, in_channels=1, num_classes=3)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "blackbox.ckpt")
    names = {}
    for samples in (2, 0):
        paths = write_report(tmp_path / "blackbox.ckpt", data, tmp_path / f"report{samples}", sanity_samples=2,
                             deletion_samples=0, examples=1, posthoc_samples=samples)
        report = json.loads(paths.json.read_text())
        names[samples] = {m["name"]: m["model"] for m in report["elements"]["localization"]["metrics"]}
    # the black box's own map is Grad-CAM at the same layer: the two rows agree
    assert names[2]["posthoc_pointing_game/built_in"] == names[2]["posthoc_pointing_game/grad_cam"]
    assert names[2]["posthoc_energy_inside_mask/built_in"] == pytest.approx(
        names[2]["posthoc_energy_inside_mask/grad_cam"], abs=1e-5)
    assert not any(name.startswith("posthoc_") for name in names[0])
    assert names[0]["pointing_game_by_diameter/4-8mm"] == names[2]["pointing_game_by_diameter/4-8mm"]
