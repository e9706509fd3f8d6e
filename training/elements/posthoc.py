"""Post-hoc explanations of any pellucid classifier, to set beside the explanation the model computes itself.

Three standard post-hoc methods, each applied to a model that returns a ``ModelOutput`` through
:class:`LogitsOnly` (the plain network: ``explain=False``), each giving one map per image for a chosen class at input
resolution, scaled to [0, 1] like ``ModelOutput.localization``:

- ``grad_cam``: Grad-CAM (Selvaraju et al., ICCV 2017) at the last layer with a spatial output that the logits depend
  on, found by running the model once (no attribute names are guessed; see :func:`grad_cam_layer`);
- ``occlusion``: MONAI's :class:`monai.visualize.OcclusionSensitivity` (Zeiler and Fergus, ECCV 2014) with a coarse
  window (``occlusion_windows`` windows per axis, no overlap, occluded by the image mean): the drop of the class
  probability when the window around a pixel is hidden, negative drops clipped to 0;
- ``integrated_gradients``: captum's :class:`captum.attr.IntegratedGradients` (Sundararajan et al., ICML 2017) from
  the image-mean baseline in ``steps`` steps; the map is the absolute attribution summed over channels.

Cost: Grad-CAM one forward and backward pass per image batch; occlusion ``occlusion_windows ** spatial_dims``
forward passes per image; integrated gradients ``steps`` forward and backward passes per image. The report card runs
them on a few images only (:mod:`pellucid.training.outputs.report_posthoc`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pellucid.models import ModelOutput
from pellucid.models.gradcam import normalize_per_map
from pellucid.models.maps import upsample_evidence

POSTHOC_METHODS = ("grad_cam", "occlusion", "integrated_gradients")


class LogitsOnly(nn.Module):
    """A pellucid model seen as a plain classifier: ``forward(image)`` returns the (B, K) logits tensor.

    Post-hoc libraries (captum, MONAI's visualisers, Quantus) call ``model(x)`` and expect a tensor; a pellucid model
    returns a :class:`~pellucid.models.ModelOutput`. The wrapper holds the model as ``self.model`` (its parameters are
    the wrapper's) and runs it with ``explain=False`` unless told otherwise.

    Args:
        model: A module whose ``forward(image, explain=...)`` returns a ``ModelOutput`` with ``logits``.
        explain: Passed to the model's forward (``False``: the plain network, no explanation computed).
    """

    def __init__(self, model: nn.Module, explain: bool = False) -> None:
        super().__init__()
        self.model, self.explain = model, explain

    def forward(self, image: Tensor) -> Tensor:
        """(B, K) logits of ``image``.

        Raises:
            ValueError: when the model makes no logits (a segmenter): post-hoc class explanations need them.
        """
        output = self.model(image, explain=self.explain)
        logits = output.logits if isinstance(output, ModelOutput) else output
        if logits is None:
            name = getattr(self.model, "name", type(self.model).__name__)
            raise ValueError(f"LogitsOnly: {name} returns no logits (ModelOutput.logits is None); post-hoc class "
                             "explanations need a classifier")
        return logits


def _spatial_outputs(model: nn.Module, image: Tensor) -> tuple[Tensor, list[tuple[str, Tensor]]]:
    """Logits and every module output shaped (B, C, *s) with C > 1 and more than one location, in forward order.

    One-channel outputs (attention gates) are left out: Grad-CAM over a single channel is that channel or nothing.
    """
    outputs: list[tuple[str, Tensor]] = []

    def keep(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            if isinstance(output, Tensor) and output.ndim == image.ndim and output.shape[0] == image.shape[0] \
                    and output.shape[1] > 1 and output.requires_grad and math.prod(output.shape[2:]) > 1:
                outputs.append((name, output))
        return hook

    handles = [module.register_forward_hook(keep(name)) for name, module in model.named_modules() if name]
    try:
        logits = LogitsOnly(model)(image)
    finally:
        for handle in handles:
            handle.remove()
    return logits, outputs


def grad_cam_layer(model: nn.Module, image: Tensor) -> str:
    """Name of the module Grad-CAM reads: the last one, in forward order, with a spatial output the logits depend on.

    A feature map (B, C, *s), C > 1, more than one location, through which the predicted class's logit has a
    non-zero gradient.

    Raises:
        ValueError: when no module output of shape (B, C, *s) reaches the logits.
    """
    with torch.inference_mode(False), torch.enable_grad():
        logits, outputs = _spatial_outputs(model, image.detach().clone())
        score = logits.amax(dim=1).sum()  # the predicted classes' logits (their sum over classes can be constant)
        gradients = torch.autograd.grad(score, [t for _, t in outputs], allow_unused=True) if outputs else ()
    for (name, _), gradient in reversed(list(zip(outputs, gradients, strict=True))):
        if gradient is not None and bool(gradient.abs().amax() > 0):
            return name
    raise ValueError(f"grad_cam: no module of {type(model).__name__} has a spatial output (B, C, *s) that the logits "
                     "depend on; Grad-CAM needs a feature map")


def grad_cam_maps(model: nn.Module, image: Tensor, classes: Tensor, layer: str | None = None) -> Tensor:
    """(N, *S) Grad-CAM maps of ``classes`` at input resolution, in [0, 1].

    Args:
        model: A pellucid classifier (in eval mode).
        image: (N, C, *S) images.
        classes: (N,) class to explain per image.
        layer: Module name to read; default :func:`grad_cam_layer`.
    """
    layer = layer or grad_cam_layer(model, image)
    module = dict(model.named_modules())[layer]
    kept: list[Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, output: kept.append(output))
    try:
        with torch.inference_mode(False), torch.enable_grad():
            logits = LogitsOnly(model)(image.detach().clone())
            activations = kept[0]
            score = logits.gather(1, classes.long().view(-1, 1).to(logits.device)).sum()
            (gradient,) = torch.autograd.grad(score, activations)
    finally:
        handle.remove()
    weights = gradient.flatten(2).mean(dim=2).view(*gradient.shape[:2], *([1] * (gradient.ndim - 2)))
    cam = F.relu((weights * activations.detach()).sum(dim=1, keepdim=True))
    return normalize_per_map(upsample_evidence(cam, image.shape[2:], "linear"))[:, 0].detach()


def _activation(task: str) -> Callable[[Tensor], Tensor]:
    return torch.sigmoid if task == "multilabel" else (lambda logits: logits.softmax(dim=-1))


def occlusion_maps(model: nn.Module, image: Tensor, classes: Tensor, *, windows: int = 8, task: str = "multiclass",
                   batch: int = 64) -> Tensor:
    """(N, *S) occlusion sensitivity of ``classes``: how much hiding each window lowers the class probability.

    MONAI's :class:`~monai.visualize.OcclusionSensitivity` with windows of ``ceil(S / windows)`` pixels per axis, no
    overlap, occluded by the image mean; the map is ``p(original) - p(occluded)``, clipped at 0 and scaled to [0, 1].

    Args:
        model: A pellucid classifier (in eval mode).
        image: (N, C, *S) images.
        classes: (N,) class to explain per image.
        windows: Windows per axis (``windows ** spatial_dims`` forward passes per image).
        task: ``"multilabel"`` reads probabilities through a sigmoid, otherwise a softmax.
        batch: Occluded images per forward pass.
    """
    from monai.visualize import OcclusionSensitivity

    size = [max(1, math.ceil(n / windows)) for n in image.shape[2:]]
    activate = _activation(task)
    wrapped = LogitsOnly(model)
    occlusion = OcclusionSensitivity(wrapped, mask_size=size, n_batch=batch, verbose=False, mode="mean_img",
                                     overlap=0.0, activate=activate)
    maps = []
    with torch.no_grad():
        original = activate(wrapped(image))
        for index in range(image.shape[0]):
            occluded, _ = occlusion(image[index:index + 1])  # (1, K, *S): probabilities with the window hidden
            k = int(classes[index])
            probability = occluded[0, k]
            probability = probability.as_tensor() if hasattr(probability, "as_tensor") else probability  # MetaTensor
            maps.append((original[index, k] - probability).clamp_min(0))
    return normalize_per_map(torch.stack(maps).unsqueeze(1).float())[:, 0]


def integrated_gradient_maps(model: nn.Module, image: Tensor, classes: Tensor, *, steps: int = 16) -> Tensor:
    """(N, *S) integrated gradients of ``classes``' logits from the image-mean baseline (captum).

    The map is the absolute attribution summed over channels, scaled to [0, 1].

    Args:
        model: A pellucid classifier (in eval mode).
        image: (N, C, *S) images.
        classes: (N,) class to explain per image.
        steps: Steps along the path from the baseline to the image.
    """
    from captum.attr import IntegratedGradients

    baseline = image.mean(dim=tuple(range(1, image.ndim)), keepdim=True).expand_as(image)
    with torch.inference_mode(False), torch.enable_grad():
        inputs = image.detach().clone()
        attribution = IntegratedGradients(LogitsOnly(model)).attribute(
            inputs, baselines=baseline.detach().clone(), target=classes.long().tolist(), n_steps=steps)
    return normalize_per_map(attribution.detach().abs().sum(dim=1, keepdim=True).float())[:, 0]


def posthoc_maps(model: nn.Module, image: Tensor, classes: Tensor, methods: Sequence[str] = POSTHOC_METHODS, *,
                 task: str = "multiclass", occlusion_windows: int = 8, ig_steps: int = 16) -> dict[str, Tensor]:
    """Each post-hoc method's (N, *S) maps of ``classes`` in [0, 1] (see the module docstring).

    Args:
        model: A pellucid classifier; it is put in eval mode for the call and restored afterwards.
        image: (N, C, *S) images.
        classes: (N,) class to explain per image (e.g. the predicted one).
        methods: Among :data:`POSTHOC_METHODS`.
        task: ``"multiclass"`` or ``"multilabel"`` (occlusion's probabilities).
        occlusion_windows: Occlusion windows per axis.
        ig_steps: Integrated-gradient steps.

    Raises:
        ValueError: naming an unknown method and the known ones.
    """
    unknown = [m for m in methods if m not in POSTHOC_METHODS]
    if unknown:
        raise ValueError(f"posthoc_maps: unknown methods {unknown}; known: {list(POSTHOC_METHODS)}")
    compute = {"grad_cam": lambda: grad_cam_maps(model, image, classes),
               "occlusion": lambda: occlusion_maps(model, image, classes, windows=occlusion_windows, task=task),
               "integrated_gradients": lambda: integrated_gradient_maps(model, image, classes, steps=ig_steps)}
    was_training = model.training
    model.eval()
    try:
        return {method: compute[method]() for method in methods}
    finally:
        model.train(was_training)
