"""The Quantus bridge: Quantus's PointingGame and AttributionLocalisation give pellucid's values on lesion images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from explain_toys import single_threaded  # noqa: F401 - a fixture, used through pytestmark
from torch import Tensor, nn
from torch.utils.data import default_collate

from pellucid.models import InterpretableModel, ModelOutput
from pellucid.training.data import PhantomConfig, PhantomDataset, PhantomGenerator
from pellucid.training.elements.evaluator import ExplanationEvaluator
from pellucid.training.elements.posthoc import LogitsOnly
from pellucid.training.elements.quantus_bridge import (
    lesion_images,
    own_explanation,
    patch_quantus_trapz,
    quantus_model,
)

quantus = pytest.importorskip("quantus", reason="the Quantus bridge needs the eval extra: pip install 'pellucid[eval]'")
pytestmark = pytest.mark.usefixtures("single_threaded")
FIELD = 8.0  # amplitude of the random field added to the max-scaled evidence: the pointing game hits and misses


class BrightnessExplainer(InterpretableModel):
    """Evidence for class k: the image smoothed over 2k + 1 pixels plus a fixed random field (on or off the lesion)."""

    def __init__(self, spatial_dims: int) -> None:
        super().__init__(spatial_dims, 1, 3)
        self.head = nn.Linear(1, 3)

    def forward(self, image: Tensor, *, explain: bool = True) -> ModelOutput:
        logits = self.head(image.flatten(1).amax(dim=1, keepdim=True))
        pool = nn.functional.avg_pool2d if self.spatial_dims == 2 else nn.functional.avg_pool3d
        maps = torch.cat([pool(image, 2 * k + 1, stride=1, padding=k) for k in range(3)], dim=1)
        field = torch.rand(image.shape[2:], generator=torch.Generator().manual_seed(0))
        maps = maps / maps.flatten(2).amax(dim=2).view(*maps.shape[:2], *([1] * self.spatial_dims)) + FIELD * field
        low = maps.flatten(2).amin(dim=2).view(*maps.shape[:2], *([1] * self.spatial_dims))
        high = maps.flatten(2).amax(dim=2).view(*maps.shape[:2], *([1] * self.spatial_dims))
        return ModelOutput(logits=logits, localization=(maps - low) / (high - low) if explain else None)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"head": list(self.head.parameters())}


def phantoms(spatial_dims: int, count: int) -> dict:
    size = 32 if spatial_dims == 2 else 16
    config = PhantomConfig(spatial_dims=spatial_dims, image_size=size, diameter_range_mm=(4.0, 8.0), noise_std=0.3)
    data = PhantomDataset(PhantomGenerator(config, seed=0), "test", count)
    return default_collate([data[i] for i in range(count)])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_quantus_gives_pellucids_pointing_game_and_energy_inside_mask(spatial_dims: int) -> None:
    torch.manual_seed(0)
    model = BrightnessExplainer(spatial_dims).eval()
    batch = phantoms(spatial_dims, 24)
    with torch.no_grad():
        output = model(batch["image"])
    evaluator = ExplanationEvaluator()
    evaluator.update(model, output, batch)
    pellucid = evaluator.compute()

    predicted = output.logits.argmax(dim=1)
    x, y, s = lesion_images(batch["image"], predicted, batch["mask"])
    assert 0 < len(y) < 24  # normal scans (no lesion) are left out
    options = dict(model=quantus_model(model), x_batch=x, y_batch=y, s_batch=s, explain_func=own_explanation,
                   device="cpu", channel_first=True)
    pointing = np.asarray(quantus.PointingGame(disable_warnings=True)(**options), dtype=float)
    energy = np.asarray(quantus.AttributionLocalisation(disable_warnings=True)(**options), dtype=float)
    assert 0.0 < pointing.mean() < 1.0  # hits and misses: the comparison can fail
    assert pointing.mean() == pytest.approx(pellucid.value("pointing_game"), abs=1e-6)
    assert energy.mean() == pytest.approx(pellucid.value("energy_inside_mask"), abs=1e-6)


def test_the_explanation_function_returns_the_models_own_map_of_the_target_class() -> None:
    model = BrightnessExplainer(2).eval()
    image = torch.rand(2, 1, 16, 16)
    wrapped = quantus_model(model)
    assert isinstance(wrapped, LogitsOnly) and wrapped.model is model
    torch.testing.assert_close(wrapped(image), model(image, explain=False).logits)  # a tensor, not a ModelOutput
    maps = own_explanation(wrapped, image.numpy(), np.array([2, 0]))
    expected = model(image).localization[[0, 1], [2, 0]].unsqueeze(1).numpy()
    assert maps.shape == (2, 1, 16, 16) and maps.dtype == np.float32
    np.testing.assert_allclose(maps, expected)
    no_maps = LogitsOnly(type("NoMaps", (BrightnessExplainer,), {
        "forward": lambda self, image, *, explain=True: ModelOutput(logits=self.head(image.flatten(1)[:, :1]))})(2))
    with pytest.raises(ValueError, match=r"returns no localization"):
        own_explanation(no_maps, image.numpy(), 0)


def test_quantus_would_count_a_scan_without_lesion_as_a_hit_so_the_bridge_leaves_it_out() -> None:
    model = BrightnessExplainer(2).eval()
    image, mask = torch.rand(2, 1, 16, 16), torch.zeros(2, 1, 16, 16)
    mask[0, 0, :2, :2] = 1  # only the first scan has a lesion
    raw = quantus.PointingGame(disable_warnings=True)(
        model=quantus_model(model), x_batch=image.numpy(), y_batch=np.array([0, 0]), s_batch=mask.numpy(),
        explain_func=own_explanation, device="cpu", channel_first=True)
    assert bool(raw[1]) is True  # Quantus 0.6: NaN written into a boolean array reads as a hit
    x, y, s = lesion_images(image, torch.tensor([0, 0]), mask)
    assert x.shape[0] == y.shape[0] == s.shape[0] == 1


def test_quantus_auc_works_on_this_numpy() -> None:
    patched = patch_quantus_trapz()
    assert patched == (not hasattr(np, "trapz"))  # patched exactly when NumPy lacks np.trapz (NumPy >= 2.4)
    from quantus.helpers import utils

    curve = np.array([[1.0, 0.5, 0.25], [1.0, 1.0, 1.0]])
    np.testing.assert_allclose(utils.calculate_auc(curve, batched=True), [1.125, 2.0])
    assert patch_quantus_trapz() == patched  # idempotent
