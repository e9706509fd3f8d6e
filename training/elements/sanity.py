"""Sanity check for explanations: cascading model-parameter randomisation.

Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018 (https://arxiv.org/abs/1810.03292). Layers are
re-drawn at random one group at a time, from the output end (top) to the input end, cumulatively; after each step the
explanation of the same images for the same (originally predicted) class is compared with the original one. An
explanation that depends on what the model learned must change; one that stays the same after every layer was
randomised is flagged (it shows something about the image, e.g. edges, not about the model).

Works for every model through ``ModelOutput.localization`` (via
:func:`~pellucid.training.elements.localization.evidence_maps`). Similarities come from torchmetrics: Spearman's rank
correlation (``spearman_corrcoef``) and the windowed structural similarity of Wang et al. 2004
(``structural_similarity_index_measure``, Gaussian window, 2D and 3D). The report card runs the check on 32 images.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics.functional import spearman_corrcoef
from torchmetrics.functional.image import structural_similarity_index_measure

from pellucid.models import InterpretableModel
from pellucid.training.elements.localization import evidence_maps, predicted_classes


@dataclass
class RandomizationStep:
    """One step of the cascade: which layers were randomised so far and how similar the explanation stayed.

    Attributes:
        layers: Layers randomised at this step (earlier steps' layers stay randomised).
        spearman: Mean over images of the Spearman rank correlation of original and randomised maps.
        ssim: Mean over images of the windowed structural similarity of the two maps (:func:`ssim_similarity`).
        unchanged: Whether ``spearman >= threshold`` (the explanation did not change).
    """

    layers: list[str]
    spearman: float
    ssim: float
    unchanged: bool


@dataclass
class SanityResult:
    """Outcome of :func:`cascading_randomization`.

    Attributes:
        steps: One entry per cascade step, top layers first.
        threshold: Spearman correlation at or above which an explanation counts as unchanged.
        flagged: The explanation stayed unchanged after every layer was randomised.
        original_maps: (N, *S) explanations of the trained model.
        randomized_maps: (N, *S) explanations after the whole cascade.
    """

    steps: list[RandomizationStep]
    threshold: float
    flagged: bool
    original_maps: Tensor = field(repr=False)
    randomized_maps: Tensor = field(repr=False)

    @property
    def final_spearman(self) -> float:
        """Spearman correlation after the whole cascade."""
        return self.steps[-1].spearman

    @property
    def final_ssim(self) -> float:
        """Structural similarity after the whole cascade."""
        return self.steps[-1].ssim

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (maps left out)."""
        return {"threshold": self.threshold, "flagged": self.flagged, "final_spearman": self.final_spearman,
                "final_ssim": self.final_ssim,
                "steps": [{"layers": s.layers, "spearman": s.spearman, "ssim": s.ssim, "unchanged": s.unchanged}
                          for s in self.steps]}


def spearman_similarity(first: Tensor, second: Tensor) -> Tensor:
    """(N,) Spearman rank correlation of (N, *S) map pairs (ties share ranks); constant maps are special.

    A constant map (e.g. an all-zero Grad-CAM after randomisation) carries no ranking: against a varying map it shares
    nothing (similarity 0); two constant maps are the same non-explanation (similarity 1: nothing changed).
    """
    a, b = first.flatten(1).double(), second.flatten(1).double()
    varies_a, varies_b = a.amax(dim=1) > a.amin(dim=1), b.amax(dim=1) > b.amin(dim=1)
    correlation = torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)
    both = varies_a & varies_b
    if bool(both.any()):  # torchmetrics ranks each column, ties sharing their average rank
        correlation[both] = spearman_corrcoef(a[both].t(), b[both].t()).view(-1).to(correlation)
    correlation = torch.where(~varies_a & ~varies_b, torch.ones_like(correlation), correlation)
    return correlation.float()


def ssim_similarity(first: Tensor, second: Tensor, value_range: float = 1.0) -> Tensor:
    """(N,) windowed structural similarity of (N, *S) 2D or 3D map pairs in [0, ``value_range``] (torchmetrics).

    The standard SSIM (Wang et al., IEEE TIP 2004): a Gaussian window of sigma 1.5 (11 pixels wide), averaged over
    every location, the map mirrored at its border (torchmetrics' convention; scikit-image averages over the interior
    only); on maps narrower than 11 pixels the window shrinks to fit them.

    Raises:
        ValueError: for maps that are not 2D or 3D, or narrower than 2 pixels.
    """
    side = min(first.shape[1:]) if first.ndim in (3, 4) else 0
    if side < 2 or first.shape != second.shape:
        raise ValueError(f"ssim_similarity: expected two (N, H, W) or (N, D, H, W) maps of one shape, at least 2 "
                         f"pixels wide, got {tuple(first.shape)} and {tuple(second.shape)}")
    sigma = min(1.5, (side - 1) / 3.5)  # torchmetrics pads by int(3.5 sigma + 0.5), which must stay below the side
    width = int(3.5 * sigma + 0.5) * 2 + 1  # the Gaussian's width (torchmetrics pads a volume's depth by kernel_size)
    # float32: torchmetrics filters with a full conv over the window; in float64 that is ~50x slower (20 s for 32
    # volumes of 16^3 on one thread), and the values agree to 1e-6
    ssim = structural_similarity_index_measure(first.unsqueeze(1).float(), second.unsqueeze(1).float(),
                                               sigma=sigma, kernel_size=width, data_range=value_range,
                                               reduction="none")
    return ssim.float()


def _explain(model: nn.Module, image: Tensor, classes: Tensor | None) -> Tensor:
    with torch.no_grad():  # Grad-CAM turns gradients back on for itself
        maps = evidence_maps(model(image, explain=True), classes)
    if maps is None:
        name = model.name if isinstance(model, InterpretableModel) else type(model).__name__
        raise ValueError(f"sanity check: {name} returns no localization, "
                         "so there is no explanation to randomise")
    return maps.detach().float()


def layers_top_first(model: nn.Module, image: Tensor) -> tuple[list[str], Tensor]:
    """Names of the modules holding parameters, in reverse order of their first call in ``forward`` (top first).

    Modules never called come last. The hooks that record the order are removed before returning.

    Returns:
        ``(names, predicted classes)``: the classes of that explained forward pass (empty without logits).
    """
    holders = [(name, module) for name, module in model.named_modules()
               if any(True for _ in module.parameters(recurse=False))]
    order: list[str] = []
    handles = [module.register_forward_hook(lambda _m, _i, _o, name=name: order.append(name)
                                            if name not in order else None) for name, module in holders]
    try:
        with torch.no_grad():
            output = model(image, explain=True)
    finally:
        for handle in handles:
            handle.remove()
    never_called = [name for name, _ in holders if name not in order]
    classes = predicted_classes(output)
    return list(reversed(order)) + never_called, classes if classes is not None else torch.empty(0, dtype=torch.long)


def randomize_parameters(module: nn.Module, generator: torch.Generator) -> None:
    """Re-draw the module's own parameters (not its children's) from N(0, s), s the parameter's current spread.

    ``s`` is the parameter's standard deviation, else its mean magnitude (e.g. norm weights of 1), else 0.1; so the
    randomised layer keeps its scale but forgets what it learned.
    """
    with torch.no_grad():
        for parameter in module.parameters(recurse=False):
            spread = float(parameter.std()) if parameter.numel() > 1 else 0.0
            spread = spread or float(parameter.abs().mean()) or 0.1
            draw = torch.randn(parameter.shape, generator=generator, dtype=torch.float32) * spread
            parameter.copy_(draw.to(parameter.device, parameter.dtype))


def cascading_randomization(model: nn.Module, image: Tensor, *, max_steps: int = 6, threshold: float = 0.8,
                            seed: int = 0) -> SanityResult:
    """Randomise the model's layers from the top, cumulatively, and compare explanations with the original ones.

    The model itself is not changed (a deep copy is randomised). Its layers (modules that hold parameters) are taken
    in reverse order of their first use in ``forward`` and split into at most ``max_steps`` contiguous groups.

    Args:
        model: A pellucid model (returns ``localization`` when explaining).
        image: (N, C, *S) images to explain.
        max_steps: Cascade steps (layer groups), at most one per layer.
        threshold: Spearman correlation at or above which a map counts as unchanged.
        seed: Seed of the random draws.

    Returns:
        The cascade's similarities per step and whether the explanation is flagged.

    Raises:
        ValueError: when the model has no parameters, returns no localization, or ``max_steps < 1``.
    """
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    was_training = model.training
    randomized = copy.deepcopy(model).eval()
    model.eval()
    try:
        layers, classes = layers_top_first(randomized, image)
        if not layers:
            raise ValueError("sanity check: the model has no parameters to randomise")
        target = classes if classes.numel() else None
        original = _explain(model, image, target)
    finally:
        model.train(was_training)
    modules = dict(randomized.named_modules())
    generator = torch.Generator().manual_seed(seed)
    steps, maps = [], original
    for group in (list(g) for g in np.array_split(np.array(layers, dtype=object), min(max_steps, len(layers)))):
        for name in group:
            randomize_parameters(modules[name], generator)
        maps = _explain(randomized, image, target)
        spearman = float(spearman_similarity(original, maps).mean())
        ssim = float(ssim_similarity(original, maps).mean())
        steps.append(RandomizationStep(layers=[str(n) or "<model>" for n in group], spearman=spearman, ssim=ssim,
                                       unchanged=spearman >= threshold))
    flagged = steps[-1].unchanged
    return SanityResult(steps=steps, threshold=threshold, flagged=flagged, original_maps=original,
                        randomized_maps=maps)


def describe(result: SanityResult) -> str:
    """One sentence for reports."""
    verdict = "FLAGGED: the explanation does not depend on the model's parameters" if result.flagged else \
        "passed: the explanation changes when the model is randomised"
    spearman = "nan" if math.isnan(result.final_spearman) else f"{result.final_spearman:.3f}"
    return (f"{verdict} (Spearman {spearman} after randomising all {sum(len(s.layers) for s in result.steps)} "
            f"layers in {len(result.steps)} steps; threshold {result.threshold:g})")

