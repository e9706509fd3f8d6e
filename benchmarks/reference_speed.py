"""Pellucid against lean reference implementations of the same work: time and peak-memory ratios (pellucid / ref).

1. Prototype head (ProtoPNet, Chen et al. 2019): squared L2 distance of every prototype to every latent patch,
   min-pooling, log similarity ``log((d + 1) / (d + 1e-4))``, bias-free last layer, loss
   ``CE + 0.8 cluster - 0.08 separation + 1e-4 L1``; forward + loss + backward (gradients reach the latent patches).
   Pellucid: the registered ``protopnet`` with its backbone and add-on replaced by identities (its input is the
   latent patches), ``explain=False`` and the loss of ``InterpretableModule.compute_loss`` (its finiteness check
   included), as in a training step. ``reference``: :class:`ReferenceHead`, the paper's equations computed the way
   the reference code (cfchen-duke/ProtoPNet) does: ``||x||^2`` as a convolution with a (P, D, 1, 1) tensor of
   ones, ``x.p`` as a convolution, ReLU, min-pooling as ``-max_pool(-d)``, cluster/separation as
   ``max_dist - max((max_dist - d) * mask)``. ``lean``: the same with ``||x||^2`` summed over the channels (no
   redundant convolution). All get the same latent patches (uniform in [0, 1], as after the add-on's sigmoid),
   prototypes, last-layer weights and labels; the script first checks they give the same loss and gradients.
   Scales: CUB (batch 80, 128 channels, 7x7 cells, 2000 prototypes, 200 classes) and phantom (the shapes of the
   model and batch of ``configs/experiments/protopnet_phantom2d.yaml``: 64, 64, 8x8, 30, 3).
2. Push at CUB scale: for each prototype, the nearest latent patch of an image of its class over ``--push-batches``
   batches (one DataLoader for both). Pellucid: ``push_prototypes`` (``push_seconds`` of the evaluation API).
   Reference: :func:`reference_push`, the loop of the reference code's ``push.py`` (distances of the batch copied
   to NumPy, then per prototype the images of its class, ``amin``/``argmin``, the patch copied out), without its
   receptive-field bookkeeping and image saving. Checked: pellucid's push with duplicates allowed reaches the same
   nearest distances; its default push (a distinct patch per prototype) is what is timed, and beside it the push with
   duplicates allowed (``time_ratio_vs_duplicates_allowed``: the cost of distinct sources).
3. Attention U-Net: pellucid's ``attention_unet`` against MONAI's ``AttentionUnet`` (which returns no gates), channels
   (16, 32, 64), the finest level at input resolution and two stride-2 steps (pellucid ``strides=(1, 2, 2)``, MONAI
   ``strides=(2, 2)``), Dice + cross-entropy on 32 2D phantoms (64x64), forward + loss + backward. ``same_levels``
   (the target) gives pellucid MONAI's blocks (``blocks="plain"``: two convolutions per encoder stage, one per decoder
   merge); ``same_levels_residual`` keeps pellucid's default ``ResidualUnit`` blocks (two convolutions and a
   projection per stage and per merge: more work). The convolution multiply-adds of each (forward hooks) and the time
   per multiply-add are reported too, as the gates and upsampling still differ a little. The shipped config
   (``strides=(2, 2, 2)``, gate sparsity on) skips the full-resolution level: listed, not the same work.
   ``--only-unet`` runs these rows alone.

Time: the variants run alternately (order rotated every repetition), ``--steps`` steps timed together; medians of the
per-repetition ratios, by wall clock and by this thread's CPU time. One torch thread by default; then every operation
runs on the timing thread and the targets are judged on its CPU time, which other processes on a shared machine
disturb far less than wall time (both are reported; on the GPU, and with more threads, wall time). Peak memory:
bytes of the tensors a step holds at once beyond those that existed before it (every step starts and ends without
gradients). CPU: the PyTorch profiler's memory timeline (each allocation and free of torch's CPU allocator,
time-stamped: ``profile(profile_memory=True, record_shapes=True, with_stack=True).export_memory_timeline``); GPU:
``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the step.

4. GPU (when CUDA is available, unless ``--no-gpu``): the same in float32 (TF32 off, so both do float32 work) and in
   bf16 autocast (the U-Nets in channels-last memory format), synchronised timings, CUDA peak memory.

Targets (issue 22): head step <= 0.9x the reference at CUB scale and <= 1.0x at phantom scale, head peak memory
<= 1.0x; push <= 0.75x at CUB scale; attention U-Net step <= 1.05x MONAI's.

    python benchmarks/reference_speed.py [--quick] [--repeats 7] [--steps 3] [--push-batches 8] [--threads 1]
        [--no-gpu | --gpu-only] [--json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.networks.nets import AttentionUnet
from torch import Tensor, nn
from torch.utils.data import DataLoader

from pellucid.models import create_model
from pellucid.training import InterpretableModule
from pellucid.training.data import PHANTOM_CLASSES
from pellucid.training.evaluate import config_settings, machine, phantom_batch
from pellucid.training.evaluate_measures import InMemory, push_loader, push_seconds

PHANTOM_EXPERIMENT = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "protopnet_phantom2d.yaml"
EPSILON = 1e-4
LOSS_WEIGHTS = {"cluster": 0.8, "separation": 0.08, "l1": 1e-4}  # the paper's, also pellucid's recipe
TARGETS = {"head_cub": 0.9, "head_phantom": 1.0, "head_peak_memory": 1.0, "push_cub": 0.75, "attention_unet": 1.05}
UNET_CHANNELS = (16, 32, 64)
Step = Callable[[], Any]


@dataclass
class HeadScale:
    """Shapes of one prototype-head comparison."""

    batch: int
    channels: int
    cells: tuple[int, int]
    prototypes_per_class: int
    classes: int


CUB = HeadScale(batch=80, channels=128, cells=(7, 7), prototypes_per_class=10, classes=200)


def phantom_scale() -> HeadScale:
    """The latent shapes of the shipped 2D phantom ProtoPNet (its config's model and batch size, 64x64 phantoms)."""
    model_kwargs = config_settings(PHANTOM_EXPERIMENT)["model_kwargs"]
    batch = int(config_settings(PHANTOM_EXPERIMENT, "data")["init_args"]["batch_size"])
    network = create_model("protopnet", 2, in_channels=1, num_classes=len(PHANTOM_CLASSES),
                           backbone_kwargs=model_kwargs["backbone_kwargs"])
    with torch.no_grad():
        cells = tuple(network.forward_features(torch.zeros(1, 1, 64, 64)).shape[2:])
    return HeadScale(batch=batch, channels=int(model_kwargs["prototype_channels"]), cells=cells,
                     prototypes_per_class=int(model_kwargs["prototypes_per_class"]), classes=len(PHANTOM_CLASSES))


# ----------------------------------------------------------------------------------- the reference
class ReferenceHead(nn.Module):
    """ProtoPNet's prototype layer, last layer and loss as the reference code computes them (2D).

    Args:
        prototypes: (P, D) prototype vectors.
        class_identity: (P, K) one-hot class of each prototype.
        last_layer: (K, P) last-layer weights.
        norm_by_convolution: ``||x||^2`` as the reference code computes it (a convolution with P x D ones) or, if
            False, as a sum over the channels.
    """

    def __init__(self, prototypes: Tensor, class_identity: Tensor, last_layer: Tensor,
                 norm_by_convolution: bool = True) -> None:
        super().__init__()
        self.prototype_vectors = nn.Parameter(prototypes.detach().clone()[..., None, None])  # (P, D, 1, 1)
        self.register_buffer("ones", torch.ones_like(self.prototype_vectors))
        self.register_buffer("prototype_class_identity", class_identity.detach().clone())
        self.last_layer = nn.Linear(last_layer.shape[1], last_layer.shape[0], bias=False)
        with torch.no_grad():
            self.last_layer.weight.copy_(last_layer)
        self.norm_by_convolution = norm_by_convolution

    def distances(self, x: Tensor) -> Tensor:
        """(B, D, H, W) -> (B, P, H, W) squared distances ``||x||^2 - 2 x.p + ||p||^2``, ReLU."""
        squared = x**2
        x2_patch_sum = F.conv2d(squared, self.ones) if self.norm_by_convolution else squared.sum(1, keepdim=True)
        p2 = (self.prototype_vectors**2).sum(dim=(1, 2, 3)).view(-1, 1, 1)
        xp = F.conv2d(x, self.prototype_vectors)
        return F.relu(x2_patch_sum + (-2 * xp + p2))

    def loss(self, x: Tensor, label: Tensor) -> Tensor:
        """Cross-entropy + 0.8 cluster - 0.08 separation + 1e-4 L1, as the reference's training loop computes them."""
        distances = self.distances(x)
        min_distances = -F.max_pool2d(-distances, kernel_size=distances.shape[2:]).flatten(1)
        logits = self.last_layer(torch.log((min_distances + 1) / (min_distances + EPSILON)))
        max_dist = self.prototype_vectors.shape[1]  # D x 1 x 1
        correct = self.prototype_class_identity[:, label].t()
        inverted, _ = torch.max((max_dist - min_distances) * correct, dim=1)
        inverted_other, _ = torch.max((max_dist - min_distances) * (1 - correct), dim=1)
        l1 = (self.last_layer.weight * (1 - self.prototype_class_identity.t())).norm(p=1)
        return (F.cross_entropy(logits, label) + LOSS_WEIGHTS["cluster"] * torch.mean(max_dist - inverted)
                - LOSS_WEIGHTS["separation"] * torch.mean(max_dist - inverted_other) + LOSS_WEIGHTS["l1"] * l1)


@torch.no_grad()
def reference_push(head: ReferenceHead, loader: DataLoader) -> None:
    """The reference code's push loop over ``loader``: every prototype becomes its nearest patch of its class."""
    count = head.prototype_vectors.shape[0]
    classes = head.prototype_class_identity.argmax(dim=1).tolist()
    global_min = np.full(count, np.inf)
    patches = np.copy(head.prototype_vectors.cpu().numpy())  # a prototype without an image of its class stays
    sources = np.full(count, -1)
    for batch in loader:
        x, labels = batch["image"].to(head.ones.device), batch["label"].tolist()
        proto_dist = np.copy(head.distances(x).cpu().numpy())
        latent = np.copy(x.cpu().numpy())
        class_to_images: dict[int, list[int]] = {k: [] for k in range(head.prototype_class_identity.shape[1])}
        for index, label in enumerate(labels):
            class_to_images[label].append(index)
        for j in range(count):
            images = class_to_images[classes[j]]
            if not images:
                continue
            proto_dist_j = proto_dist[images][:, j, :, :]
            batch_min = np.amin(proto_dist_j)
            if batch_min < global_min[j]:
                where = list(np.unravel_index(np.argmin(proto_dist_j, axis=None), proto_dist_j.shape))
                where[0] = images[where[0]]
                patches[j] = latent[where[0], :, where[1]:where[1] + 1, where[2]:where[2] + 1]
                global_min[j] = batch_min
                sources[j] = int(batch["push_index"][where[0]])
    head.prototype_vectors.copy_(torch.from_numpy(patches))


# ------------------------------------------------------------------------------------------ measuring
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _key(prefix: str, other: str) -> str:
    return prefix if other == "reference" else f"{prefix}_vs_{other}"


def interleave(variants: dict[str, Step], repeats: int, steps: int, device: torch.device) -> dict[str, Any]:
    """Median ms of each variant and median per-repetition ratios of ``pellucid`` (the first) to each other one.

    Each variant runs once first (allocator pools, first-call dispatch); then every repetition runs each ``steps``
    times, in an order rotated by one per repetition. Two clocks: wall time (``ms_*``, ``time_ratio*``) and this
    thread's CPU time (``cpu_ms_*``, ``cpu_time_ratio*``; with one torch thread every CPU operation runs on it).
    """
    for run in variants.values():
        run()
    _synchronize(device)
    names = list(variants)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            wall, cpu = time.perf_counter(), time.thread_time()
            for _ in range(steps):
                variants[name]()
            _synchronize(device)
            times[name].append(((time.perf_counter() - wall) / steps, (time.thread_time() - cpu) / steps))
    result: dict[str, Any] = {}
    for clock, index in (("", 0), ("cpu_", 1)):
        result.update({f"{clock}ms_{name}": round(1e3 * statistics.median(t[index] for t in times[name]), 2)
                       for name in names})
        for other in names[1:]:
            ratios = [mine[index] / theirs[index] for mine, theirs in zip(times[names[0]], times[other], strict=True)]
            result[clock + _key("time_ratio", other)] = round(statistics.median(ratios), 3)
            result[clock + _key("time_ratio", other) + "_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
    return result


def peak_step_bytes(step: Step, device: torch.device) -> int:
    """Peak bytes of tensors ``step`` holds at once beyond those that existed before it (one call, after a warm-up)."""
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "memory.raw.json.gz")
        prof.export_memory_timeline(path, device="cpu")  # (time, action, bytes, category), in time order
        with gzip.open(path, "rt") as raw:
            events = json.load(raw)
    preexisting = sum(size for _, action, size, _ in events if action == 1)  # action 1: PREEXISTING
    live = peak = preexisting
    for _, action, size, _ in events:
        if action != 1:
            live += size
            peak = max(peak, live)
    return peak - preexisting


def memory(variants: dict[str, Step], device: torch.device) -> dict[str, Any]:
    """Peak MB of each variant and the ratios of ``pellucid`` (the first) to each other one."""
    peaks = {name: peak_step_bytes(step, device) for name, step in variants.items()}
    names = list(peaks)
    result: dict[str, Any] = {f"peak_mb_{name}": round(peak / 2**20, 2) for name, peak in peaks.items()}
    result.update({_key("memory_ratio", other): round(peaks[names[0]] / peaks[other], 3) for other in names[1:]})
    return result


def without_gradients_after(step: Step, *holders: nn.Module | Tensor) -> Step:
    """``step``, then every gradient of ``holders`` dropped: each measured step starts and ends without them."""
    def run() -> None:
        step()
        for holder in holders:
            if isinstance(holder, Tensor):
                holder.grad = None
            else:
                holder.zero_grad(set_to_none=True)
    return run


# ------------------------------------------------------------------------------------ prototype head
def pellucid_head(scale: HeadScale, device: torch.device) -> InterpretableModule:
    """The registered ProtoPNet with identity backbone and add-on (input: latent patches) in the training module."""
    torch.manual_seed(0)
    network = create_model("protopnet", 2, in_channels=scale.channels, num_classes=scale.classes,
                           prototypes_per_class=scale.prototypes_per_class, prototype_channels=scale.channels)
    network.backbone, network.add_on = nn.Identity(), nn.Identity()
    return InterpretableModule(network).to(device).train()


def references(module: InterpretableModule, device: torch.device) -> dict[str, ReferenceHead]:
    """The reference head and its lean variant with pellucid's prototypes and last layer."""
    layer, weight = module.model.prototypes, module.model.last_layer.weight
    return {name: ReferenceHead(layer.vectors, layer.class_identity, weight, by_convolution).to(device)
            for name, by_convolution in (("reference", True), ("lean", False))}


def head_steps(module: InterpretableModule, heads: dict[str, ReferenceHead], features: Tensor, labels: Tensor,
               autocast: bool = False) -> dict[str, Step]:
    """One forward + loss + backward per head (gradients cleared first); each returns its loss."""
    batch, device_type = {"image": features, "label": labels}, features.device.type

    def pellucid() -> Tensor:
        features.grad = None
        module.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            total, _ = module.compute_loss(module.model(features, explain=False), batch)
        total.backward()
        return total.detach()

    def reference(head: ReferenceHead) -> Step:
        def run() -> Tensor:
            features.grad = None
            head.zero_grad(set_to_none=True)
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
                total = head.loss(features, labels)
            total.backward()
            return total.detach()
        return run

    return {"pellucid": pellucid, **{name: reference(head) for name, head in heads.items()}}


def check_same_work(steps: dict[str, Step], module: InterpretableModule, heads: dict[str, ReferenceHead],
                    features: Tensor) -> None:
    """Every head gives pellucid's loss and gradients (latent patches, prototypes, last layer), in float32."""
    def gradients(name: str) -> tuple[Tensor, list[Tensor]]:
        loss = steps[name]()
        if name == "pellucid":
            layer, last = module.model.prototypes.vectors, module.model.last_layer.weight
        else:
            layer, last = heads[name].prototype_vectors, heads[name].last_layer.weight
        return loss, [features.grad.clone(), layer.grad.flatten(1).clone(), last.grad.clone()]

    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        mine, mine_grads = gradients("pellucid")
        for name in heads:
            theirs, their_grads = gradients(name)
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5, msg=lambda text, n=name: f"{n}: {text}")
            for what, a, b in zip(("latent patches", "prototypes", "last layer"), mine_grads, their_grads, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda t, n=name, w=what: f"{n} {w}: {t}")


def compare_heads(scale: HeadScale, repeats: int, steps: int, device: torch.device,
                  autocast: bool = False) -> dict[str, Any]:
    """Time and peak-memory ratios of one training step of the heads at ``scale``."""
    module = pellucid_head(scale, device)
    heads = references(module, device)
    generator = torch.Generator().manual_seed(1)
    features = torch.rand(scale.batch, scale.channels, *scale.cells, generator=generator).to(device)
    labels = torch.randint(scale.classes, (scale.batch,), generator=generator).to(device)
    variants = head_steps(module, heads, features.requires_grad_(), labels, autocast)
    if not autocast:
        check_same_work(variants, module, heads, features)
    clean = {name: without_gradients_after(step, features, module, *heads.values()) for name, step in variants.items()}
    return {"shape": asdict(scale), **interleave(variants, repeats, steps, device), **memory(clean, device)}


# ---------------------------------------------------------------------------------------------- push
def compare_push(scale: HeadScale, batches: int, repeats: int, device: torch.device) -> dict[str, Any]:
    """Push time of pellucid and of the reference loop over the same loader, both from the same prototypes."""
    module = pellucid_head(scale, device).eval()
    layer, start = module.model.prototypes, module.model.prototypes.vectors.detach().clone()
    head = references(module, device)["reference"]
    generator = torch.Generator().manual_seed(2)
    features = torch.rand(batches * scale.batch, scale.channels, *scale.cells, generator=generator)
    labels = torch.randint(scale.classes, (len(features),), generator=generator)
    loader = push_loader(InMemory([{"image": f, "label": y, "id": f"latent-{i}"}
                                   for i, (f, y) in enumerate(zip(features, labels, strict=True))]), scale.batch)

    def pellucid(unique_sources: bool = True) -> None:
        with torch.no_grad():
            layer.vectors.copy_(start)
        push_seconds(module.model, loader, unique_sources=unique_sources)

    def reference() -> None:
        with torch.no_grad():
            head.prototype_vectors.copy_(start[..., None, None])
        reference_push(head, loader)

    def duplicates() -> int:
        sources = [(s.sample_index, tuple(s.feature_index)) for s in layer.sources if s is not None]
        return len(sources) - len(set(sources))

    pellucid(unique_sources=False), reference()
    # the reference's push (duplicates allowed) reaches the same nearest distances (the patch itself may differ where
    # two are equally near up to rounding)
    reached = [(pushed.detach().flatten(1) - start).pow(2).sum(1) for pushed in (layer.vectors, head.prototype_vectors)]
    torch.testing.assert_close(*reached, rtol=1e-4, atol=1e-4)
    shared = duplicates()
    pellucid()
    if duplicates():
        raise AssertionError(f"push_cub: the default push left {duplicates()} duplicate sources, expected 0")
    # timed: pellucid's default push (a distinct patch per prototype), the reference, and pellucid's push with
    # duplicates allowed (the reference's work): time_ratio_vs_duplicates_allowed is the cost of distinct sources
    timing = interleave({"pellucid": pellucid, "reference": reference,
                         "duplicates_allowed": lambda: pellucid(unique_sources=False)}, repeats, 1, device)
    return {"images": len(features), "batch": scale.batch, "duplicate_sources_when_allowed": shared, **timing}


# ----------------------------------------------------------------------------------- attention U-Net
def convolution_macs(model: nn.Module, image: Tensor) -> int:
    """Multiply-adds of every (transposed) convolution in one forward pass of ``model`` on ``image``."""
    total = 0

    def count(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal total
        kernel = math.prod(module.kernel_size) // module.groups
        if isinstance(module, nn.modules.conv._ConvTransposeNd):  # each input value meets out_channels x kernel
            total += inputs[0].numel() * module.out_channels * kernel
        else:
            total += output.numel() * module.in_channels * kernel

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    with torch.no_grad():
        model(image)
    for hook in hooks:
        hook.remove()
    return total


def unet_steps(batch: dict[str, Any], device: torch.device, strides: tuple[int, ...], gate_sparsity: bool,
               blocks: str, autocast: bool = False, channels_last: bool = False
               ) -> tuple[dict[str, Step], dict[str, int]]:
    """One forward + Dice-CE + backward of pellucid's attention U-Net and MONAI's, and their multiply-adds."""
    torch.manual_seed(0)
    ours = create_model("attention_unet", 2, in_channels=1, num_classes=2, channels=UNET_CHANNELS, strides=strides,
                        gate_sparsity=gate_sparsity, blocks=blocks).to(device).train()
    torch.manual_seed(0)
    monai = AttentionUnet(2, 1, 2, channels=UNET_CHANNELS, strides=(2, 2)).to(device).train()
    dice_ce = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
    image, mask = batch["image"], batch["mask"].long()
    if channels_last:
        ours, monai = ours.to(memory_format=torch.channels_last), monai.to(memory_format=torch.channels_last)
        image = image.contiguous(memory_format=torch.channels_last)
    macs = {"pellucid": convolution_macs(ours.eval(), image), "reference": convolution_macs(monai.eval(), image)}
    ours.train(), monai.train()
    weights, device_type = {"gate_sparsity": 0.1}, device.type  # the shipped config's weight

    def pellucid() -> None:
        ours.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            terms = ours.loss_terms(ours(image, explain=False), {"mask": mask})
            total = sum(weights.get(name, 1.0) * value for name, value in terms.items())
        total.backward()

    def reference() -> None:
        monai.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            total = dice_ce(monai(image), mask)
        total.backward()

    steps = {"pellucid": pellucid, "reference": reference}
    return {name: without_gradients_after(step, ours, monai) for name, step in steps.items()}, macs


def compare_unets(repeats: int, steps: int, device: torch.device, autocast: bool = False) -> dict[str, Any]:
    """The comparison with the same levels and blocks, with the same levels and pellucid's default residual blocks,
    and the shipped configuration, each against MONAI."""
    batch = phantom_batch(2, 32, device=device)
    results: dict[str, Any] = {"channels": list(UNET_CHANNELS), "batch": 32, "image_size": [64, 64]}
    for key, strides, sparsity, blocks in (("same_levels", (1, 2, 2), False, "plain"),
                                           ("same_levels_residual", (1, 2, 2), False, "residual"),
                                           ("shipped_config", (2, 2, 2), True, "residual")):
        variants, macs = unet_steps(batch, device, strides, sparsity, blocks, autocast,
                                    channels_last=device.type == "cuda")
        timing = interleave(variants, repeats, steps, device)
        mac_ratio = macs["pellucid"] / macs["reference"]
        results[key] = {"pellucid_strides": list(strides), "monai_strides": [2, 2], "gate_sparsity": sparsity,
                        "pellucid_blocks": blocks,
                        **timing, **memory(variants, device),
                        **{f"gmac_{name}": round(count / 1e9, 3) for name, count in macs.items()},
                        "mac_ratio": round(mac_ratio, 3),
                        "time_per_mac_ratio": round(timing["time_ratio"] / mac_ratio, 3),
                        "cpu_time_per_mac_ratio": round(timing["cpu_time_ratio"] / mac_ratio, 3)}
    return results


# ----------------------------------------------------------------------------------------------- run
def run_all(device: torch.device, arguments: argparse.Namespace, autocast: bool = False) -> dict[str, Any]:
    """Every comparison on ``device``."""
    repeats, steps, begin = arguments.repeats, arguments.steps, time.perf_counter()
    report: dict[str, Any] = {"device": str(device), "bf16_autocast": autocast}
    if arguments.only_unet:
        report["attention_unet"] = compare_unets(repeats, steps, device, autocast)
        return report
    report["head_cub"] = compare_heads(CUB, repeats, steps, device, autocast)
    report["head_phantom"] = compare_heads(phantom_scale(), repeats, steps, device, autocast)
    report["push_cub"] = compare_push(CUB, arguments.push_batches, max(3, repeats // 2), device)
    report["attention_unet"] = compare_unets(repeats, steps, device, autocast)
    report["seconds"] = round(time.perf_counter() - begin, 1)
    clock = "cpu_" if device.type == "cpu" and torch.get_num_threads() == 1 else ""
    report["judged_on"] = "thread CPU time" if clock else "wall time"
    ratio = {key: report[key][f"{clock}time_ratio"] for key in ("head_cub", "head_phantom", "push_cub")}
    ratio["attention_unet"] = report["attention_unet"]["same_levels"][f"{clock}time_ratio"]
    report["meets_target"] = {
        **{key: value <= TARGETS[key] for key, value in ratio.items()},
        "head_peak_memory": max(report[k]["memory_ratio"] for k in ("head_cub", "head_phantom"))
        <= TARGETS["head_peak_memory"]}
    return report


def summary(report: dict[str, Any]) -> str:
    """A few lines of ratios: wall time, then this thread's CPU time (CPU runs)."""
    lines = [f"{report['device']}{' bf16 autocast' if report['bf16_autocast'] else ''} (pellucid / reference; "
             f"targets judged on {report['judged_on']}):"]

    def times(r: dict[str, Any], key: str = "time_ratio") -> str:
        cpu = f", CPU {r['cpu_' + key]:.3f}x" if "cpu_" + key in r and report["device"] == "cpu" else ""
        return f"{r[key]:.3f}x wall{cpu}"

    for key in ("head_cub", "head_phantom"):
        r = report[key]
        lines.append(f"  {key:14s} time {times(r)} ({r['ms_pellucid']:.1f} / {r['ms_reference']:.1f} ms; vs lean "
                     f"{times(r, 'time_ratio_vs_lean')})  peak memory {r['memory_ratio']:.3f}x "
                     f"({r['peak_mb_pellucid']:.1f} / {r['peak_mb_reference']:.1f} MB; vs lean "
                     f"{r['memory_ratio_vs_lean']:.3f}x)")
    r = report["push_cub"]
    lines.append(f"  push_cub       time {times(r)} ({r['ms_pellucid']:.0f} / {r['ms_reference']:.0f} ms)")
    for key in ("same_levels", "same_levels_residual", "shipped_config"):
        r = report["attention_unet"][key]
        lines.append(f"  unet {key:20s} time {times(r)} ({r['ms_pellucid']:.0f} / {r['ms_reference']:.0f} ms), "
                     f"multiply-adds {r['mac_ratio']:.3f}x, time per multiply-add {r['time_per_mac_ratio']:.3f}x, "
                     f"peak memory {r['memory_ratio']:.3f}x")
    lines.append(f"  meets target: {report['meets_target']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 repetitions of 1 step, 2 push batches")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repetitions per time ratio")
    parser.add_argument("--steps", type=int, default=3, help="steps timed together in one repetition")
    parser.add_argument("--push-batches", type=int, default=8, help="batches of the push dataset (CUB scale)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (0: torch's choice)")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU section even when CUDA is available")
    parser.add_argument("--gpu-only", action="store_true", help="only the GPU section (a lent GPU's short call)")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--only-unet", action="store_true", help="only the attention U-Net comparisons")
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.repeats, arguments.steps, arguments.push_batches = 2, 1, 2
    if min(arguments.repeats, arguments.steps, arguments.push_batches) < 1:
        parser.error("--repeats, --steps and --push-batches must be at least 1")
    if arguments.gpu_only and (arguments.no_gpu or not torch.cuda.is_available()):
        parser.error("--gpu-only needs CUDA (torch.cuda.is_available() is False) and no --no-gpu")
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    start = time.perf_counter()
    report: dict[str, Any] = {"targets": TARGETS, "repeats": arguments.repeats, "steps_per_repeat": arguments.steps}
    if not arguments.gpu_only:
        report["cpu"] = run_all(torch.device("cpu"), arguments)
        if not arguments.json and not arguments.only_unet:
            print(summary(report["cpu"]), flush=True)
    if torch.cuda.is_available() and not arguments.no_gpu:
        report["gpu_name"] = torch.cuda.get_device_name()
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 work on both sides
        report["gpu_float32"] = run_all(torch.device("cuda"), arguments)
        report["gpu_bf16"] = run_all(torch.device("cuda"), arguments, autocast=True)
        if not arguments.json:
            print(summary(report["gpu_float32"]), summary(report["gpu_bf16"]), sep="\n", flush=True)
    report["wall_s"] = round(time.perf_counter() - start, 1)
    report["machine"] = machine()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
