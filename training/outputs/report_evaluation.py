"""The report card's evaluation of one checkpoint: ``Trainer.test`` with the five-element callback, examples, sanity.

:func:`evaluate_checkpoint` runs exactly what training runs (the module's test or validation step with
:class:`~pellucid.training.elements.callback.FiveElementMetrics`), keeps a few explained samples for figures, and
runs the parameter-randomisation sanity check and the built-in against post-hoc comparison
(:mod:`pellucid.training.outputs.report_posthoc`) on them; :func:`element_figures` turns that into example figures per
element.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pytorch_lightning as pl
import torch

from pellucid.models import ModelOutput
from pellucid.models.concepts import as_concept_spec
from pellucid.training.data.base import PellucidDataModule
from pellucid.training.elements.callback import ELEMENTS, FiveElementMetrics, FiveElementResults
from pellucid.training.elements.families import prototype_gallery
from pellucid.training.elements.localization import evidence_maps
from pellucid.training.elements.sanity import SanityResult, cascading_randomization, describe
from pellucid.training.module import InterpretableModule
from pellucid.training.outputs import figures
from pellucid.training.outputs.report_posthoc import PosthocComparison, compare_posthoc, comparison_figures
from pellucid.training.outputs.slice_viewer import slice_viewer_item

_EXAMPLE_KEYS = ("image", "mask", "confounder_mask", "concepts", "label", "lesion_type")


def _check_fits(module: InterpretableModule, data: PellucidDataModule, what: str) -> None:
    model = module.model
    for attribute in ("spatial_dims", "in_channels", "num_classes"):
        expected, actual = getattr(model, attribute), getattr(data, attribute)
        if expected != actual:
            raise ValueError(f"{what} ({model.name}) was built for {attribute}={expected}, but the data has "
                             f"{attribute}={actual}")


@dataclass
class Example:
    """One sample kept for figures: its batch entries and its (batch of one) explained output."""

    sample_id: str
    inputs: dict[str, torch.Tensor]
    output: ModelOutput


@dataclass
class ModelEvaluation:
    """What the report shows about one checkpoint."""

    name: str
    checkpoint: str
    task_metrics: dict[str, float]
    results: FiveElementResults
    sanity: SanityResult | None
    examples: list[Example] = field(default_factory=list)
    class_names: list[str] | None = None
    concepts: list[Any] | None = None
    gallery: bytes | None = None
    posthoc: PosthocComparison | None = None


class _ExampleCollector(pl.Callback):
    """Keeps the first ``count`` samples the evaluation sees (inputs and explained outputs, on the CPU)."""

    def __init__(self, count: int) -> None:
        self.count, self.examples = count, []

    def _keep(self, outputs: Any, batch: Mapping[str, Any]) -> None:
        if not isinstance(outputs, ModelOutput) or len(self.examples) >= self.count:
            return
        output = outputs.cpu()
        for index, sample_id in enumerate(output.ids or batch["id"]):
            if len(self.examples) >= self.count:
                return
            inputs = {k: batch[k][index].detach().cpu() for k in _EXAMPLE_KEYS if k in batch}
            self.examples.append(Example(str(sample_id), inputs, output.apply(lambda t, i=index: t[i:i + 1])))

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        """Keep examples."""
        self._keep(outputs, batch)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        """Keep examples."""
        self._keep(outputs, batch)


def _with_lesion_first(examples: Sequence[Example]) -> list[Example]:
    def has(example: Example, key: str) -> bool:
        return key in example.inputs and bool(example.inputs[key].max() > 0)

    return sorted(examples, key=lambda e: (not has(e, "mask"), not has(e, "confounder_mask")))


def evaluate_checkpoint(module: InterpretableModule, data: PellucidDataModule, *, name: str, checkpoint: str = "",
                        split: str = "test", limit_batches: int | float | None = None, sanity_samples: int = 32,
                        deletion_samples: int = 64, accelerator: str = "cpu", pool: int = 32,
                        posthoc_samples: int = 8) -> ModelEvaluation:
    """Run the five-element evaluation of ``module`` on ``data`` (``Trainer.test``/``validate``) and the sanity check.

    Args:
        module: The trained module.
        data: The data module.
        name: Label in the report (e.g. ``"model"``, ``"baseline"``).
        checkpoint: Where the module came from (shown in the report).
        split: ``"test"`` or ``"val"``.
        limit_batches: Evaluate only this many batches (or this fraction).
        sanity_samples: Images in the randomisation check (0 skips it), lesion images first.
        deletion_samples: Samples with deletion curves.
        accelerator: Lightning accelerator.
        pool: Samples kept as candidate figure examples (at least ``sanity_samples`` and ``posthoc_samples``).
        posthoc_samples: Images with a lesion on which the built-in map is compared with Grad-CAM, occlusion and
            integrated gradients of the same model (0 skips it).
    """
    if split not in ("test", "val"):
        raise ValueError(f"--split must be 'test' or 'val', got {split!r}")
    _check_fits(module, data, name)
    five = FiveElementMetrics(stages=(split,), deletion_samples=deletion_samples)
    collector = _ExampleCollector(max(pool, sanity_samples, posthoc_samples))
    limit = {"limit_test_batches" if split == "test" else "limit_val_batches": limit_batches} if limit_batches else {}
    trainer = pl.Trainer(accelerator=accelerator, devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=[five, collector],
                         default_root_dir=None, **limit)
    run = trainer.test if split == "test" else trainer.validate
    logged = run(module, datamodule=data, verbose=False)[0]
    prefix = f"{split}/"
    task_metrics = {k[len(prefix):]: float(v) for k, v in logged.items()
                    if k.startswith(prefix) and not k.startswith(f"{prefix}five/") and "loss" not in k}
    examples = _with_lesion_first(collector.examples)
    sanity = None
    if sanity_samples > 0 and examples:
        images = torch.stack([e.inputs["image"] for e in examples[:sanity_samples]])
        sanity = cascading_randomization(module.model.cpu(), images)
    results = five.results[split]
    posthoc = compare_posthoc(module.model.cpu(), examples, samples=posthoc_samples,
                              task=getattr(module, "task", "multiclass")) if posthoc_samples > 0 and examples else None
    if posthoc is not None:  # the comparison's rows and notes join the localization element of this evaluation
        notes = [posthoc] if isinstance(posthoc, str) else posthoc.notes
        rows = [] if isinstance(posthoc, str) else posthoc.metrics
        results = replace(results, metrics=[*results.metrics, *rows],
                          notes={**results.notes, "localization": [*results.notes.get("localization", []), *notes]})
        posthoc = None if isinstance(posthoc, str) else posthoc
    hparams = module.hparams
    gallery = prototype_gallery(module.model, lambda: _push_dataset(data), hparams.get("class_names"))
    return ModelEvaluation(name=name, checkpoint=checkpoint, task_metrics=task_metrics, results=results,
                           sanity=sanity, examples=examples, class_names=hparams.get("class_names"),
                           concepts=[as_concept_spec(c) for c in hparams.get("concepts") or []] or None,
                           gallery=None if gallery is None else figures.figure_png(gallery), posthoc=posthoc)


def _push_dataset(data: PellucidDataModule) -> Any:
    """The dataset prototypes were pushed from: ``push_dataset()`` when defined, else the training split's."""
    if callable(getattr(data, "push_dataset", None)):
        return data.push_dataset()
    data.setup("fit")
    return data.train_dataloader().dataset


# ------------------------------------------------------------------------------------------------- figures
def element_figures(evaluation: ModelEvaluation, count: int = 3) -> dict[str, list[tuple[str, bytes]]]:
    """Example figures per element, as ``(caption, PNG bytes)``."""
    found: dict[str, list[tuple[str, bytes]]] = {element: [] for element in ELEMENTS}
    class_names = evaluation.class_names or []

    def title(example: Example) -> str:
        parts = [example.sample_id]
        if example.output.logits is not None:
            index = int(example.output.logits[0].argmax())
            parts.append(f"predicted {class_names[index] if index < len(class_names) else index}")
        label = example.inputs.get("label")
        if label is not None and label.ndim == 0:
            parts.append(f"true {class_names[int(label)] if int(label) < len(class_names) else int(label)}")
        return " · ".join(parts)

    def overlay(example: Example) -> bytes:
        maps = evidence_maps(example.output)
        return figures.figure_png(figures.overlay_figure(
            example.inputs["image"], None if maps is None else maps[0], example.inputs.get("mask"),
            example.inputs.get("confounder_mask"), title(example)))

    for example in evaluation.examples[:count]:
        found["localization"].append((f"{title(example)}: evidence of the predicted class", overlay(example)))
        if example.inputs["image"].ndim == 4:  # a volume: evidence peak and lesion centre slices side by side
            maps = evidence_maps(example.output)
            found["localization"].append(slice_viewer_item(example.inputs, None if maps is None else maps[0],
                                                           title(example)))
    if evaluation.posthoc is not None:
        found["localization"] += comparison_figures(evaluation.posthoc, count)
    if evaluation.gallery is not None:
        found["visual_recognizability"].append(("prototype gallery: each prototype's source patch (push provenance, + "
                                                "its centre; 3D: axial, coronal, sagittal slices through it)",
                                                evaluation.gallery))
    output_examples = [e for e in evaluation.examples if e.output.prototype_maps is not None
                       and e.output.prototype_similarity is not None][:count]
    for example in output_examples:
        found["visual_recognizability"].append((f"{title(example)}: most similar prototypes", figures.figure_png(
            figures.prototype_figure(example.inputs["image"], example.output.prototype_maps[0],
                                     example.output.prototype_similarity[0], 3, title(example)))))
    specs = evaluation.concepts or []
    for example in [e for e in evaluation.examples if e.output.concept_logits is not None][:count]:
        if len(specs) != example.output.concept_logits.shape[1]:
            break
        rows = figures.concept_rows(example.output.concept_logits[0], example.inputs.get("concepts"), specs)
        found["physical_attribution"].append((f"{title(example)}: predicted vs true concepts", figures.figure_png(
            figures.concept_table_figure(rows, title(example)))))
    curves = {c.name: c for c in evaluation.results.curves}
    if "deletion" in curves:
        pair = {n: (curves[n].x, curves[n].y) for n in ("deletion", "reverse_deletion") if n in curves}
        found["transparency"].append(("deletion curves: most-evidenced pixels first vs least-evidenced first",
                                      figures.figure_png(figures.curve_figure(
                                          pair, curves["deletion"].xlabel, curves["deletion"].ylabel, "deletion"))))
    if evaluation.sanity is not None:
        sanity, image = evaluation.sanity, evaluation.examples[0].inputs["image"]
        found["transparency"].append((describe(sanity), figures.figure_png(figures.sanity_figure(
            sanity.to_dict()["steps"], image, sanity.original_maps[0], sanity.randomized_maps[0], sanity.threshold,
            "parameter randomisation"))))
    labels = {"intervention": "model order", "intervention_uncertainty": "most uncertain first",
              "intervention_random": "random order"}
    chosen = {labels.get(n, n): (c.x, c.y) for n, c in curves.items() if n.startswith("intervention")}
    if chosen:
        first = next(c for n, c in curves.items() if n.startswith("intervention"))
        found["actionability"].append(("intervention curves: accuracy as concepts are set to their true value",
                                       figures.figure_png(figures.curve_figure(chosen, first.xlabel, first.ylabel,
                                                                               "interventions"))))
    marked = [e for e in evaluation.examples if "confounder_mask" in e.inputs and bool(e.inputs["confounder_mask"].max()
                                                                                       > 0)][:1]
    for example in marked:
        found["actionability"].append((f"{title(example)}: evidence vs shortcut marker (green)", overlay(example)))
    return found
