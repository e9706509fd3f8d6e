"""Cascading parameter randomisation: learned explanations change, model-independent ones are flagged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from explain_toys import (
    single_threaded,  # noqa: F401 - a fixture, used through pytestmark
    toy_transparent,
)
from synthetic import make_batch
from torch import Tensor, nn

from pellucid.models import InterpretableModel, ModelOutput, create_model
from pellucid.training.elements.sanity import (
    cascading_randomization,
    describe,
    layers_top_first,
    spearman_similarity,
    ssim_similarity,
)

pytestmark = pytest.mark.usefixtures("single_threaded")
class IntensityIsTheExplanation(InterpretableModel):
    """Its 'explanation' is the image itself (an edge-detector-like map): no parameter can change it."""

    def __init__(self) -> None:
        super().__init__(2, 1, 3)
        self.head = nn.Linear(1, 3)

    def forward(self, image: Tensor, *, explain: bool = True) -> ModelOutput:
        logits = self.head(image.mean(dim=(1, 2, 3))[:, None])
        low = image.amin(dim=(1, 2, 3), keepdim=True)
        high = image.amax(dim=(1, 2, 3), keepdim=True)
        return ModelOutput(logits=logits, localization=((image - low) / (high - low)).expand(-1, 3, -1, -1))

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"head": list(self.head.parameters())}


def test_similarities_on_known_pairs() -> None:
    ramp = torch.arange(16.0).view(1, 4, 4) / 15
    assert float(spearman_similarity(ramp, ramp)[0]) == pytest.approx(1.0)
    assert float(spearman_similarity(ramp, 1 - ramp)[0]) == pytest.approx(-1.0)
    assert float(spearman_similarity(ramp, ramp**3)[0]) == pytest.approx(1.0)  # ranks, not values
    assert float(spearman_similarity(ramp, torch.zeros(1, 4, 4))[0]) == 0.0  # a constant map ranks nothing
    assert float(spearman_similarity(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4))[0]) == 1.0  # nothing changed
    tied = torch.tensor([[1.0, 2.0, 2.0, 3.0], [4.0, 3.0, 2.0, 1.0]])  # ties share their average rank (2.5)
    other = torch.tensor([[1.0, 3.0, 2.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    torch.testing.assert_close(spearman_similarity(tied, other), torch.tensor([4.5 / 22.5**0.5, -1.0]))
    assert float(ssim_similarity(ramp, ramp)[0]) == pytest.approx(1.0)  # a 4x4 map: the window shrinks to fit
    assert float(ssim_similarity(ramp, 1 - ramp)[0]) < 0
    with pytest.raises(ValueError, match=r"expected two \(N, H, W\) or \(N, D, H, W\) maps.*got \(2, 4\)"):
        ssim_similarity(tied, other)


@pytest.mark.parametrize("shape", [(16, 16), (16, 16, 16), (24, 32)])
def test_similarities_agree_with_independent_libraries(shape: tuple[int, ...]) -> None:
    """Windowed SSIM against scikit-image's Gaussian-window SSIM, Spearman against scipy, on related random maps."""
    from scipy.stats import spearmanr
    from skimage.metrics import structural_similarity

    generator = torch.Generator().manual_seed(len(shape))
    first = torch.rand(3, *shape, generator=generator)
    second = (first + torch.linspace(0.1, 1.0, 3).view(3, *([1] * len(shape))) * torch.rand(3, *shape,
                                                                                             generator=generator))
    second = second.clamp(0, 1)
    ssim, spearman = ssim_similarity(first, second), spearman_similarity(first, second)
    for index in range(3):
        a, b = first[index].double().numpy(), second[index].double().numpy()
        # the mean over every pixel of the map mirrored by 5 (the window's reach); scikit-image's own mean leaves the
        # 5-pixel border out, so its full SSIM map of the mirrored maps is read at the original pixels
        _, full = structural_similarity(np.pad(a, 5, mode="reflect"), np.pad(b, 5, mode="reflect"), data_range=1.0,
                                        gaussian_weights=True, sigma=1.5, use_sample_covariance=False, full=True)
        expected = full[tuple(slice(5, -5) for _ in shape)].mean()
        assert float(ssim[index]) == pytest.approx(expected, abs=2e-5)
        assert float(spearman[index]) == pytest.approx(spearmanr(a.ravel(), b.ravel()).statistic, abs=1e-5)
    assert bool((ssim[0] > ssim[2]) & (spearman[0] > spearman[2]))  # more noise, less similar
    assert not np.isclose(float(ssim[0]), float(spearman[0]))  # two different measures


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_learned_explanation_changes_and_is_not_flagged(spatial_dims: int) -> None:
    torch.manual_seed(0)
    model = create_model("blackbox", spatial_dims, in_channels=1, num_classes=3).eval()
    image = make_batch(spatial_dims, batch_size=2)["image"]
    before = {name: p.clone() for name, p in model.named_parameters()}
    result = cascading_randomization(model, image, max_steps=3)
    assert not result.flagged and "passed" in describe(result)
    assert len(result.steps) == 3
    assert result.steps[0].layers[0] == "classifier"  # the top layer goes first
    assert result.final_spearman < result.threshold
    assert result.original_maps.shape == result.randomized_maps.shape == (2, *image.shape[2:])
    # the model itself is untouched and carries no hooks
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert not any(m._forward_hooks for m in model.modules())


def test_an_explanation_that_ignores_the_parameters_is_flagged() -> None:
    torch.manual_seed(0)
    result = cascading_randomization(IntensityIsTheExplanation(), make_batch(2, batch_size=2)["image"])
    assert result.flagged and "FLAGGED" in describe(result)
    assert all(step.unchanged and step.spearman == pytest.approx(1.0) for step in result.steps)
    summary = result.to_dict()
    assert summary["flagged"] is True and summary["steps"][0]["layers"] == ["head"]


def test_layers_come_in_reverse_order_of_use_and_every_layer_is_randomised() -> None:
    model = toy_transparent(2)
    image = make_batch(2, batch_size=1)["image"]
    order, classes = layers_top_first(model, image)
    assert set(order) == {name for name, m in model.named_modules() if any(True for _ in m.parameters(False))}
    assert order.index("last_layer") < order.index("concept_layer") < order.index("features")
    assert classes.shape == (1,)
    result = cascading_randomization(model, image, max_steps=10)
    assert sorted(sum((s.layers for s in result.steps), [])) == sorted(n or "<model>" for n in order)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="max_steps must be >= 1, got 0"):
        cascading_randomization(IntensityIsTheExplanation(), torch.zeros(1, 1, 8, 8), max_steps=0)
