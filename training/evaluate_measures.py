"""Measurements beyond the report card, part of the public evaluation API (:mod:`pellucid.training.evaluate`).

- localization: the true class's pointing game and energy over a test run (:class:`LocalizationScores`), the
  pointing game under each upsampling a model offers (:func:`pointing_by_interpolation`), and the ceiling of the
  pointing game at a feature stride with no model involved (:func:`upsampling_ceiling`, 2D and 3D);
- visual recognizability: how well a model's latent patches on the lesions separate the lesion types
  (:func:`lesion_patches`, :func:`latent_separation`: the ceiling of prototype purity); push cost against a forward
  pass (:func:`time_forward_and_push`, :func:`push_seconds`); a prototype gallery (:func:`write_prototype_gallery`);
- physical attribution, transparency and actionability of concept models on the phantom
  (:func:`concept_evaluation`: concept metrics, leakage, intervention curves, the head against the label rule);
- memory: this process's resident memory and its peak while code runs (:class:`PeakResidentMemory`, Linux).
"""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from pellucid.models.maps import INTERPOLATION_WEIGHTS, resize_maps
from pellucid.models.prototype_losses import lesion_coverage
from pellucid.training.concepts.interventions import POLICIES, evaluate_interventions
from pellucid.training.data import LABEL_RULE, PHANTOM_CLASSES
from pellucid.training.data.phantom_rule import LESION_TYPE_NAMES
from pellucid.training.elements.concept_maps import ConceptMapPointing
from pellucid.training.elements.localization import EnergyInsideMask, PointingGame, class_maps
from pellucid.training.elements.physical_attribution import (
    ConceptMetrics,
    LeakageCheck,
    head_rule_agreement,
    soft_and_hard_logits,
)
from pellucid.training.elements.visual_recognizability import PrototypeEvaluation
from pellucid.training.prototypes.gallery import build_gallery, save_gallery
from pellucid.training.prototypes.nearest import find_nearest_patches
from pellucid.training.prototypes.push import push_dataloader, push_prototypes

FINDINGS = ("irregular", "spiculated", "calcified")  # the phantom's binary findings (words of the lesion types)
DIAMETER_BINS_MM = ((4.0, 8.0), (8.0, 12.0), (12.0, 16.0), (16.0, 20.01))


# ------------------------------------------------------------------------------------------------ memory
def resident_mb() -> float:
    """Current resident memory of this process in MB (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


class PeakResidentMemory(threading.Thread):
    """Samples the resident memory every ``interval_s`` until :meth:`stop`; keeps the peak.

    Use as a context manager: ``with PeakResidentMemory() as peak: ...`` then ``peak.increase_mb``.

    Args:
        interval_s: Seconds between samples.
    """

    def __init__(self, interval_s: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.interval_s, self.before_mb = interval_s, resident_mb()
        self.peak_mb = self.before_mb
        self._done = threading.Event()

    def run(self) -> None:
        """Sample until stopped."""
        while not self._done.wait(self.interval_s):
            self.peak_mb = max(self.peak_mb, resident_mb())

    def stop(self) -> float:
        """Stop sampling; return the peak resident memory in MB."""
        self._done.set()
        self.join()
        self.peak_mb = max(self.peak_mb, resident_mb())
        return self.peak_mb

    @property
    def increase_mb(self) -> float:
        """Peak minus the resident memory when the sampler was made."""
        return self.peak_mb - self.before_mb

    def __enter__(self) -> PeakResidentMemory:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ----------------------------------------------------------------------------------------- localization
class LocalizationScores(pl.Callback):
    """Pointing game and energy inside the mask of the true class's localization map, over the test split."""

    def __init__(self) -> None:
        self.pointing, self.energy = PointingGame(), EnergyInsideMask()

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                          batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Score the batch's true-class maps."""
        maps = class_maps(outputs.localization.cpu(), batch["label"].cpu())
        self.pointing.update(maps, batch["mask"].cpu())
        self.energy.update(maps, batch["mask"].cpu())


def pointing_by_interpolation(model: nn.Module, loader: Any) -> dict[str, float]:
    """Pointing game of the true class's ``localization`` over ``loader`` with each upsampling the model offers."""
    kept, scores, device = model.localization_interpolation, {}, next(model.parameters()).device
    model.eval()
    try:
        for mode in INTERPOLATION_WEIGHTS:
            model.localization_interpolation, pointing = mode, PointingGame()
            with torch.no_grad():
                for batch in loader:
                    maps = model(batch["image"].to(device)).localization.cpu()
                    pointing.update(class_maps(maps, batch["label"]), batch["mask"])
            scores[mode] = round(float(pointing.compute()), 4)
    finally:
        model.localization_interpolation = kept
    return scores


def upsampling_ceiling(masks: Tensor, stride: int) -> dict[str, float]:
    """Pointing game of the ideal cell map (each cell's share of lesion pixels/voxels) at ``stride``, per upsampling.

    No model is involved: this is the best a map at feature resolution can score once upsampled (a linearly
    upsampled map peaks on a cell center, so a lesion between centers cannot hold its maximum; cubic can).

    Args:
        masks: (N, 1, *S) lesion masks, 2D or 3D; every axis of ``S`` divisible by ``stride``.
        stride: Cell size in pixels/voxels along each axis.

    Raises:
        ValueError: when an axis of the masks is not divisible by ``stride``.
    """
    size = tuple(masks.shape[2:])
    if any(n % stride for n in size):
        raise ValueError(f"upsampling_ceiling: image size {size} is not divisible by stride {stride}")
    cells = lesion_coverage(masks, tuple(n // stride for n in size)).unsqueeze(1)
    scores = {}
    for mode in sorted(INTERPOLATION_WEIGHTS):
        pointing = PointingGame()
        pointing.update(resize_maps(cells, size, mode), masks)
        scores[mode] = round(float(pointing.compute()), 4)
    return scores


# ------------------------------------------------------------------------------------ prototypes and push
@torch.no_grad()
def lesion_patches(model: nn.Module, data: Any, split: str = "test") -> tuple[Tensor, Tensor, Tensor]:
    """(N, D) latent patch on the best-covered cell of each lesion of ``split``, (N,) lesion types and (N,) labels.

    Raises:
        TypeError: when the model has no ``forward_features`` returning one (B, D, *s) tensor.
    """
    if not hasattr(model, "forward_features"):
        raise TypeError(f"{type(model).__name__} has no forward_features (latent patches) to compare")
    vectors, types, labels = [], [], []
    for batch in getattr(data, f"{split}_dataloader")():
        features = model.forward_features(batch["image"])
        if not isinstance(features, Tensor):
            raise TypeError(f"{type(model).__name__}.forward_features returns {type(features).__name__}, "
                            "expected one (B, D, *s) tensor")
        best = lesion_coverage(batch["mask"], features.shape[2:]).flatten(1).argmax(dim=1)  # best-covered cell
        vectors.append(features.flatten(2)[torch.arange(len(best)), :, best])
        types.append(batch["lesion_type"])
        labels.append(batch["label"])
    vector, lesion_type, label = torch.cat(vectors), torch.cat(types), torch.cat(labels)
    keep = lesion_type > 0
    return vector[keep], lesion_type[keep], label[keep]


def latent_separation(vectors: Tensor, types: Tensor, labels: Tensor, k: int) -> dict[str, Any]:
    """Among each lesion patch's k nearest other patches: share of the same type, class, and each finding."""
    distances = torch.cdist(vectors.double(), vectors.double())
    distances.fill_diagonal_(float("inf"))
    nearest = distances.topk(k, dim=1, largest=False).indices
    same_type = (types[nearest] == types[:, None]).double().mean(dim=1)
    same_class = (labels[nearest] == labels[:, None]).double().mean(dim=1)
    findings = {name: torch.tensor([name in LESION_TYPE_NAMES[t].split() for t in range(len(LESION_TYPE_NAMES))])
                for name in FINDINGS}
    same_finding = {name: round((has[types[nearest]] == has[types][:, None]).double().mean().item(), 3)
                    for name, has in findings.items()}
    return {"lesions": len(types), "channels": vectors.shape[1], "same_type": round(same_type.mean().item(), 3),
            "same_class": round(same_class.mean().item(), 3),
            "share_at_least_0.7": round((same_type >= 0.7).double().mean().item(), 3), "same_finding": same_finding}


class InMemory(Dataset):
    """Items generated beforehand, so timings measure the model and not data generation."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def push_loader(dataset: Dataset, batch_size: int) -> DataLoader:
    """The unshuffled, index-tagged loader push reads (one process)."""
    return push_dataloader(dataset, batch_size)


def push_seconds(network: nn.Module, loader: DataLoader, unique_sources: bool = True) -> float:
    """Seconds of one push of ``network``'s prototypes over ``loader`` (the prototypes are replaced).

    ``unique_sources``: a distinct source patch per prototype (the default push); ``False``: the original ProtoPNet's
    push, where prototypes may share one.
    """
    return push_prototypes(network, loader, unique_sources=unique_sources).seconds


def time_forward_and_push(network: nn.Module, loader: DataLoader, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of ``repeats`` alternating forward passes (logits only) and pushes over ``loader``.

    One batch goes through both first, so kernel set-up is paid outside the timing.
    """
    network.eval()
    with torch.no_grad():
        first = next(iter(loader))["image"]
        network(first, explain=False), network.push_candidates(first)
    forward_times, push_times = [], []
    for _ in range(repeats):
        with torch.no_grad():
            begin = time.perf_counter()
            for batch in loader:
                network(batch["image"], explain=False)
            forward_times.append(time.perf_counter() - begin)
        push_times.append(push_seconds(network, loader))
    return forward_times, push_times


def write_prototype_gallery(model: nn.Module, dataset: Dataset, batch_size: int, class_names: Sequence[str] | None,
                            folder: str | Path, k: int = 5) -> list[Path]:
    """Gallery of every prototype with its ``k`` nearest images of ``dataset``, written to ``folder``."""
    model.eval()
    nearest = find_nearest_patches(model, push_dataloader(dataset, batch_size), k=k)
    return save_gallery(build_gallery(model, dataset, nearest, class_names), folder)


def prototype_test_callbacks(k: int = 10) -> list[pl.Callback]:
    """Callbacks measuring the prototype metrics (purity at ``k`` nearest images ...) on the test split."""
    return [PrototypeEvaluation(k=k, stages=["test"])]


# --------------------------------------------------------------------------------------------- concepts
@torch.no_grad()
def concept_evaluation(model: nn.Module, batches: Sequence[dict[str, Any]], trials: dict[str, int]) -> dict[str, Any]:
    """Concept, leakage, intervention, transparency and localization numbers of a concept model on ``batches``.

    Args:
        model: A concept model (``concept_specs``, ``concept_logits``) trained on phantom data.
        batches: Test batches with ``image``, ``label``, ``mask`` and ``concepts``.
        trials: Random orders per intervention policy (``random``, ``uncertainty``, ``group``).
    """
    model = model.eval()
    specs = model.concept_specs
    concepts, leakage = ConceptMetrics(specs), LeakageCheck()
    pointing, energy = PointingGame(), EnergyInsideMask()
    concept_pointing = ConceptMapPointing(specs)
    agreement, count, has_concept_maps = 0.0, 0, False
    all_logits, all_truth = [], []
    device = next(model.parameters()).device
    for batch in batches:
        image = batch["image"].to(device)
        output = model(image, explain=True).cpu()
        concepts.update(output.concept_logits, batch["concepts"])
        all_logits.append(output.concept_logits)
        all_truth.append(batch["concepts"])
        soft, hard = soft_and_hard_logits(model, image)
        leakage.update(soft.cpu(), hard.cpu(), batch["label"])
        maps = class_maps(output.localization, batch["label"])
        pointing.update(maps, batch["mask"])
        energy.update(maps, batch["mask"])
        if output.concept_maps is not None:
            has_concept_maps = True
            concept_pointing.update(output.concept_maps, batch["mask"], batch["concepts"].float())
        rule_labels = LABEL_RULE.label_from_concepts(batch["concepts"])
        agreed = head_rule_agreement(model, image, batch["concepts"].to(device), rule_labels)
        agreement += float(agreed) * len(rule_labels)
        count += len(rule_labels)
    results: dict[str, Any] = {"concepts": {k: float(v) for k, v in concepts.compute().items()},
                               "leakage": {k: float(v) for k, v in leakage.compute().items()},
                               "localization": {"pointing_game": float(pointing.compute()),
                                                "energy_inside_mask": float(energy.compute())}}
    results["binary_accuracy_on_lesions_by_diameter_mm"] = accuracy_by_diameter(
        specs, torch.cat(all_logits), torch.cat(all_truth))
    if has_concept_maps:
        results["concept_map_pointing_game"] = concept_pointing.compute()
    results["interventions"] = {}
    for policy in POLICIES:
        curve = evaluate_interventions(model, batches, policy, trials=trials[policy], seed=0)
        results["interventions"][policy] = {
            "accuracy": [round(float(a), 4) for a in curve["accuracy"]], "auc": float(curve["auc"]),
            "gain": float(curve["gain"]), "monotonic": bool(curve["monotonic"]), "trials": trials[policy]}
    results["transparency"] = {"head_agrees_with_rule_on_true_concepts": agreement / max(count, 1)}
    if hasattr(model, "describe_head"):
        results["transparency"]["head_table"] = model.describe_head(PHANTOM_CLASSES).splitlines()
        results["transparency"]["rule"] = LABEL_RULE.describe()
        results["transparency"].update(rule_comparison(model))
    return results


def rule_comparison(model: nn.Module) -> dict[str, Any]:
    """The concept head's malignant-vs-benign weights per unit (``explanation_head``) against the label rule."""
    rule_points = {"spiculated": LABEL_RULE.spiculated_points, "irregular": LABEL_RULE.irregular_points,
                   "calcified": LABEL_RULE.calcified_points}
    head = model.explanation_head()
    benign, malignant = PHANTOM_CLASSES.index("benign"), PHANTOM_CLASSES.index("malignant")
    contrast = {name: float(head.weight[malignant, m] - head.weight[benign, m]) for m, name in enumerate(head.names)}
    bias = float(head.bias[malignant] - head.bias[benign])
    expected_sign = {**{k: (v > 0) - (v < 0) for k, v in rule_points.items()}, "diameter_mm": 1}
    signs = {k: (contrast[k] > 0) - (contrast[k] < 0) == s for k, s in expected_sign.items()}
    per_irregular = {k: contrast[k] / contrast["irregular"] for k in rule_points} if contrast["irregular"] else {}
    # A lesion worth one point without its size (irregular only) is malignant iff large: where does the head switch?
    mean_contrast = 0.65  # middle of the phantom's lesion contrast range (0.3, 1.0)
    offset = bias + contrast["irregular"] + contrast.get("contrast", 0.0) * mean_contrast
    threshold = -offset / contrast["diameter_mm"] if contrast["diameter_mm"] else float("nan")
    return {"malignant_minus_benign_per_unit": contrast, "bias": bias, "sign_agreement": sum(signs.values()) / 4,
            "signs_match": signs, "binary_weights_per_irregular": per_irregular,
            "rule_binary_points_per_irregular": {k: v / rule_points["irregular"] for k, v in rule_points.items()},
            "implied_diameter_threshold_mm": threshold, "rule_diameter_threshold_mm": LABEL_RULE.large_diameter_mm}


def accuracy_by_diameter(specs: Sequence[Any], logits: Tensor, truth: Tensor) -> dict[str, dict[str, float]]:
    """Each binary concept's accuracy on the scans with a lesion, by lesion diameter (small lesions are ambiguous)."""
    diameter = truth[:, [spec.name for spec in specs].index("diameter_mm")]
    results: dict[str, dict[str, float]] = {}
    for column, spec in enumerate(specs):
        if spec.kind != "binary":
            continue
        results[spec.name] = {}
        for low, high in DIAMETER_BINS_MM:
            rows = (diameter >= low) & (diameter < high)
            hits = (logits[rows, column] > 0) == (truth[rows, column] >= 0.5)
            results[spec.name][f"{low:g}-{high:g}"] = float(hits.float().mean()) if bool(rows.any()) else float("nan")
    return results
