"""The report card's built-in against post-hoc comparison: one model, its own map and three post-hoc maps.

On a few evaluated images with a lesion (:func:`compare_posthoc`), each map of the predicted class — the model's own
``localization`` (``built_in``) and Grad-CAM, MONAI occlusion sensitivity and captum's integrated gradients of the same
model (:mod:`pellucid.training.elements.posthoc`) — is scored with the localization metrics of the five-element
evaluation (:class:`~pellucid.training.elements.localization.PointingGame`,
:class:`~pellucid.training.elements.localization.EnergyInsideMask`). The values are registered metrics
(``posthoc_pointing_game/{explainer}``, ``posthoc_energy_inside_mask/{explainer}``), shown as rows of the report's
localization table beside the whole-split metrics; :func:`comparison_figures` draws the maps side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from pellucid.training.elements.localization import EnergyInsideMask, PointingGame, evidence_maps, informative_maps
from pellucid.training.elements.posthoc import POSTHOC_METHODS, posthoc_maps
from pellucid.training.elements.results import MetricResult
from pellucid.training.outputs import figures

BUILT_IN = "built_in"
TITLES = {BUILT_IN: "built-in", "grad_cam": "Grad-CAM", "occlusion": "occlusion (MONAI)",
          "integrated_gradients": "integrated gradients (captum)"}


@dataclass
class PosthocComparison:
    """The maps and localization scores of the built-in and post-hoc explanations on the same images.

    Attributes:
        sample_ids: The images compared.
        images: (N, C, *S) the images.
        masks: (N, 1, *S) their lesion masks.
        maps: Explainer (``built_in`` first, then the post-hoc methods) -> (N, *S) maps of the predicted class.
        metrics: The registered ``posthoc_*`` rows.
        notes: What a reader needs to know (images used, what could not be computed).
    """

    sample_ids: list[str]
    images: Tensor
    masks: Tensor
    maps: dict[str, Tensor]
    metrics: list[MetricResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _scores(maps: Tensor, masks: Tensor) -> tuple[float, float]:
    pointing, energy = PointingGame(), EnergyInsideMask()
    informative = informative_maps(maps)  # a constant map points at nothing, as in the evaluation's pointing game
    pointing.update(maps[informative], masks[informative])
    energy.update(maps, masks)
    hits = float(pointing.total) / maps.shape[0]  # constant maps count as misses, over every compared image
    return hits, float(energy.compute())


def compare_posthoc(model: nn.Module, examples: Sequence[Any], *, samples: int = 8,
                    methods: Sequence[str] = POSTHOC_METHODS, task: str = "multiclass", occlusion_windows: int = 8,
                    ig_steps: int = 16) -> PosthocComparison | str:
    """Score the built-in and post-hoc maps of the predicted class on the first ``samples`` examples with a lesion.

    Args:
        model: The evaluated model (on the examples' device, the CPU in the report).
        examples: The report's kept examples (``inputs`` with ``image`` and ``mask``, ``output`` of one sample).
        samples: Images compared (those with a non-empty mask, in the given order).
        methods: Post-hoc methods (:data:`~pellucid.training.elements.posthoc.POSTHOC_METHODS`).
        task: The module's task (occlusion reads sigmoid probabilities for ``"multilabel"``).
        occlusion_windows: Occlusion windows per axis.
        ig_steps: Integrated-gradient steps.

    Returns:
        The comparison, or one sentence saying why it was not made (no logits, no image with a lesion).
    """
    chosen = [e for e in examples if "mask" in e.inputs and bool(e.inputs["mask"].max() > 0)][:samples]
    if not chosen:
        return "no post-hoc comparison: none of the kept examples has a lesion mask"
    if any(e.output.logits is None for e in chosen):
        return "no post-hoc comparison: the model makes no logits (post-hoc class explanations need them)"
    images = torch.stack([e.inputs["image"] for e in chosen]).float()
    masks = (torch.stack([e.inputs["mask"] for e in chosen]).float() > 0).float().view(images.shape[0], 1,
                                                                                       *images.shape[2:])
    classes = torch.cat([e.output.logits.argmax(dim=1) for e in chosen])
    own = [evidence_maps(e.output) for e in chosen]
    maps = {} if any(m is None for m in own) else {BUILT_IN: torch.cat(own).float()}
    maps.update(posthoc_maps(model, images, classes, methods, task=task, occlusion_windows=occlusion_windows,
                             ig_steps=ig_steps))
    metrics = []
    for explainer in (BUILT_IN, *methods):
        hits, energy = _scores(maps[explainer], masks) if explainer in maps else (None, None)
        metrics += [MetricResult.of(f"posthoc_pointing_game/{explainer}", hits),
                    MetricResult.of(f"posthoc_energy_inside_mask/{explainer}", energy)]
    window = ", ".join(str(max(1, -(-n // occlusion_windows))) for n in images.shape[2:])
    notes = [f"post-hoc comparison on {len(chosen)} images with a lesion ({', '.join(e.sample_id for e in chosen)}): "
             f"occlusion windows of ({window}) pixels, integrated gradients in {ig_steps} steps from the image mean"]
    if BUILT_IN not in maps:
        notes.append("post-hoc comparison: the model returns no localization, so built_in is not measured")
    return PosthocComparison([e.sample_id for e in chosen], images, masks, maps, metrics, notes)


def _slice(volume: np.ndarray, index: int | None) -> np.ndarray:
    return volume if index is None else volume[index]


def comparison_figures(comparison: PosthocComparison, count: int = 3) -> list[tuple[str, bytes]]:
    """``(caption, PNG)`` per compared image (the first ``count``): the image and every explainer's map in a row.

    3D images show the axial slice through the lesion's centre, the same slice for every map.
    """
    found = []
    explainers = list(comparison.maps)
    for number, sample_id in enumerate(comparison.sample_ids[:count]):
        grey = figures.display_image(comparison.images[number])
        mask = comparison.masks[number, 0].numpy()
        depth = None if grey.ndim == 2 else int(round(float(np.argwhere(mask > 0)[:, 0].mean())))
        figure = Figure(figsize=(2.1 * (len(explainers) + 1), 2.4), layout="constrained")
        axes = figure.subplots(1, len(explainers) + 1, squeeze=False)[0]
        for column, explainer in enumerate([None, *explainers]):
            axis = axes[column]
            axis.imshow(_slice(grey, depth), cmap="gray", interpolation="nearest")
            if explainer is not None:
                heat = _slice(comparison.maps[explainer][number].numpy(), depth)
                axis.imshow(heat, cmap=figures.HEATMAP, alpha=0.55, vmin=0.0, vmax=1.0, interpolation="bilinear")
            if _slice(mask, depth).max() > 0:
                axis.contour(_slice(mask, depth) > 0.5, levels=[0.5], colors="cyan", linewidths=0.8)
            axis.set_title("image" if explainer is None else TITLES.get(explainer, explainer), fontsize=8)
            axis.set_xticks([])
            axis.set_yticks([])
        where = "" if depth is None else f", axial slice {depth}"
        figure.suptitle(f"{sample_id}{where}", fontsize=9)
        found.append((f"{sample_id}: built-in vs post-hoc maps of the predicted class{where} (lesion in cyan)",
                      figures.figure_png(figure)))
    return found
