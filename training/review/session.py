"""What ``pellucid review`` serves, without HTTP: a model under review on one split, and its corrections file.

The session holds the model, the samples of one split, predictions with and without concept interventions, the
prototypes with their source patches, and the prototype corrections file.

Every public method takes plain values (as they arrive in a JSON request), checks them and returns plain,
JSON-serialisable values; a request it cannot serve raises :class:`ReviewError`, one line naming what was asked,
what was expected and what was given. The server (:mod:`pellucid.training.review.server`) turns it into HTTP 400.

Marks are written at once (:mod:`pellucid.training.review.corrections_state`): :meth:`ReviewSession.mark` marks a
prototype's source patch, :meth:`ReviewSession.mark_activation` the patch of a training sample where a prototype
activates most (reviewing ``--split train``: the fine-tune's losses re-read training images).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pellucid.models.concept_layers import unit_values
from pellucid.models.concepts import as_concept_spec
from pellucid.models.gradcam import normalize_per_map
from pellucid.models.maps import upsample_evidence
from pellucid.training.concepts.intervention_file import unit_range
from pellucid.training.data.base import PellucidDataModule
from pellucid.training.elements.localization import evidence_maps
from pellucid.training.metrics import probabilities
from pellucid.training.module import InterpretableModule
from pellucid.training.review import render
from pellucid.training.review.checks import ReviewError, check_index, check_mark, check_note
from pellucid.training.review.corrections_state import ReviewCorrections, image_box, peak_cells

SPLITS = ("test", "val", "train")
MAX_PAGE = 100  # samples per list request
TOP_PROTOTYPES = 3  # prototypes shown per prediction
RANGE_SAMPLES = 256  # samples read to set a continuous concept's slider range
SOURCE_KEYS = ("sample_id", "sample_index", "feature_index", "image_box")  # what a correction records of a source
SOURCE_HEIGHT = 128  # source patches are enlarged (nearest neighbour) to about this many pixels high


def split_dataset(datamodule: PellucidDataModule, split: str) -> Dataset:
    """The unshuffled dataset of ``split`` (``"test"``, ``"val"`` or ``"train"``)."""
    if split not in SPLITS:
        raise ReviewError(f"split: expected one of {list(SPLITS)}, got {split!r}")
    datamodule.setup({"train": "fit", "val": "validate", "test": "test"}[split])
    loader = {"train": datamodule.train_dataloader, "val": datamodule.val_dataloader,
              "test": datamodule.test_dataloader}[split]()
    return loader.dataset


def push_dataset(datamodule: PellucidDataModule) -> Dataset:
    """The dataset prototype sources index (push's): ``push_dataset()`` if defined, else the training split's."""
    if callable(getattr(datamodule, "push_dataset", None)):
        return datamodule.push_dataset()
    return split_dataset(datamodule, "train")


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


class ReviewSession:
    """One model under review on one split of one dataset (thread-safe: one request uses the model at a time).

    Args:
        module: The trained module (``load_module``); its model is put in eval mode on ``device``.
        datamodule: The data to review it on; it must fit the model (spatial dims, channels, classes).
        corrections_path: The corrections file marks are written to; an existing one is read and continued.
        checkpoint: What was loaded (a path or zoo name), recorded in the corrections file.
        data: What data config was given, for the page.
        split: ``"test"``, ``"val"`` or ``"train"``.
        limit: Review only the first ``limit`` samples of the split.
        device: Torch device of the model.

    Raises:
        ReviewError: for data that does not fit the model, or a corrections file written for another model or other
            prototype sources.
    """

    def __init__(self, module: InterpretableModule, datamodule: PellucidDataModule, corrections_path: str | Path,
                 *, checkpoint: str = "", data: str = "", split: str = "test", limit: int | None = None,
                 device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = module.model.to(self.device).eval()
        hparams = module.hparams
        for attribute in ("spatial_dims", "in_channels", "num_classes"):
            expected, actual = getattr(self.model, attribute), getattr(datamodule, attribute, None)
            if expected != actual:
                raise ReviewError(f"--data: the model ({self.model.name}) was built for {attribute}={expected}, the "
                                  f"data has {attribute}={actual}; review it on data like its training data")
        self.datamodule, self.checkpoint, self.data, self.split = datamodule, checkpoint, data, split
        self.dataset = split_dataset(datamodule, split)
        self.count = len(self.dataset) if limit is None else min(len(self.dataset), max(0, int(limit)))
        if self.count == 0:
            raise ReviewError(f"--split {split}: expected samples to review, the split holds none")
        self.task = hparams.get("task") or datamodule.task
        names = hparams.get("class_names") or getattr(datamodule, "class_names", None)
        self.class_names = list(names or [str(k) for k in range(self.model.num_classes)])
        self.concept_specs = [as_concept_spec(s) for s in (self.model.concept_specs or [])]
        self.accepts_interventions = bool(self.concept_specs) and self.model.accepts_interventions()
        classes, provenance = self.model.prototype_classes(), self.model.prototype_provenance()
        self.prototype_classes = None if classes is None or provenance is None else [int(c) for c in classes]
        self.provenance = provenance if self.prototype_classes is not None else None
        self.corrections_path = Path(corrections_path)
        self.corrections = ReviewCorrections(corrections_path, self.model.name, checkpoint, self.provenance,
                                             self.model.spatial_dims)
        self._lock = threading.RLock()
        self._items: dict[int, dict[str, Any]] = {}
        self._listed: dict[int, dict[str, Any]] = {}
        self._sources: dict[int, bytes] = {}
        self._push_data: Dataset | None = None
        self._peak_cells: dict[int, tuple[list[list[int]], tuple[int, ...]]] = {}
        self._controls: list[dict[str, Any]] | None = None

    # ---------------------------------------------------------------------------------------------- overview
    def info(self) -> dict[str, Any]:
        """What the page needs first: the model, data, classes, concept controls, prototypes and corrections."""
        return {"model": self.model.name, "checkpoint": self.checkpoint, "data": self.data, "split": self.split,
                "samples": self.count, "spatial_dims": self.model.spatial_dims, "task": self.task,
                "classes": self.class_names, "concepts": self.concept_controls(),
                "interventions": self.accepts_interventions,
                "prototypes": 0 if self.provenance is None else len(self.provenance),
                "corrections": self.corrections_state(), "activation_problem": self.activation_problem()}

    def concept_controls(self) -> list[dict[str, Any]]:
        """Per concept: name, kind, unit, description, allowed values and a slider range.

        ``allowed`` is the unit's range (``None`` for an open end); ``slider`` spans the split's annotated values,
        widened by a quarter (binary: [0, 1]).
        """
        if self._controls is None:
            observed = self._observed_concepts()
            controls = []
            for column, spec in enumerate(self.concept_specs):
                low, high = unit_range(spec)
                slider = (0.0, 1.0) if spec.kind == "binary" else _slider(observed[:, column], low, high)
                controls.append({"name": spec.name, "kind": spec.kind, "unit": spec.unit, "group": spec.group,
                                 "description": spec.description, "allowed": [_finite(low), _finite(high)],
                                 "slider": list(slider)})
            self._controls = controls
        return self._controls

    def _observed_concepts(self) -> np.ndarray:
        rows = []
        for index in range(min(self.count, RANGE_SAMPLES)):
            concepts = self.item(index).get("concepts")
            if concepts is not None and concepts.numel() == len(self.concept_specs):
                rows.append(concepts.float().cpu().numpy())
        return np.stack(rows) if rows else np.full((1, len(self.concept_specs)), np.nan, dtype=np.float32)

    def item(self, index: int) -> dict[str, Any]:
        """Sample ``index`` of the split (read once)."""
        if index not in self._items:
            self._items[index] = self.dataset[index]
        return self._items[index]

    def samples(self, offset: Any = 0, count: Any = 20) -> dict[str, Any]:
        """A page of the split: per sample its index, id, true label, predicted class and its probability."""
        offset = check_index(offset, self.count, "offset")
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_PAGE:
            raise ReviewError(f"count: expected an integer in [1, {MAX_PAGE}], got {count!r}")
        indices = list(range(offset, min(self.count, offset + count)))
        missing = [i for i in indices if i not in self._listed]
        if missing:
            images = torch.stack([self.item(i)["image"].float() for i in missing]).to(self.device)
            with self._lock, torch.no_grad():
                output = self.model(images, explain=False)
            for row, index in enumerate(missing):
                self._listed[index] = {"index": index, "id": self._id(index), "label": self._label(index),
                                       **self._decision(None if output.logits is None else output.logits[row])}
        return {"offset": offset, "total": self.count, "samples": [self._listed[i] for i in indices]}

    # ------------------------------------------------------------------------------------------- prediction
    def predict(self, index: Any, interventions: Any = None) -> dict[str, Any]:
        """Sample ``index`` predicted and explained, with the given concept interventions applied.

        Args:
            index: Sample index in the split.
            interventions: ``{concept name: value in its unit}`` (binary: 0/1 or a probability); ``None`` or ``{}``
                for none.

        Returns:
            ``index``, ``id``, ``label``; ``prediction`` (class, index, probabilities) and, with interventions,
            ``without_interventions``; ``views`` (captioned image and evidence of the predicted class, PNG data
            URIs) and ``evidence_empty`` (the map is zero everywhere); ``concepts`` (predicted, true, and whether
            set); ``prototypes`` (the most similar ones, with their activation on the image and the patch where it
            is largest, with its mark); ``abstained`` when the model can abstain.
        """
        index = check_index(index, self.count, "sample index")
        mask, values, applied = self.intervention_tensors(interventions)
        item = self.item(index)
        image = item["image"].float().unsqueeze(0).to(self.device)
        with self._lock, torch.no_grad():
            options = {} if not applied else {"concept_mask": mask.to(self.device),
                                              "concept_values": values.to(self.device)}
            output = self.model(image, explain=True, **options)
            plain = self.model(image, explain=False) if applied else None
        evidence = evidence_maps(output)
        views = render.sample_views(item["image"], None if evidence is None else evidence[0], item.get("mask"),
                                    item.get("confounder_mask"))
        result: dict[str, Any] = {
            "index": index, "id": self._id(index), "label": self._label(index), "interventions": applied,
            "prediction": self._decision(None if output.logits is None else output.logits[0]),
            "without_interventions": None if plain is None else self._decision(plain.logits[0]),
            "views": [{"caption": v.caption, "image": render.png_data_uri(v.image),
                       "overlay": None if v.overlay is None else render.png_data_uri(v.overlay)} for v in views],
            "evidence_empty": evidence is not None and not bool((evidence > 0).any()),
            "concepts": self._concepts(output, item, applied),
            "prototypes": self._top_prototypes(index, output, item["image"], applied),
        }
        abstained = self.model.abstentions(output)
        result["abstained"] = None if abstained is None else bool(abstained[0])
        return result

    def intervention_tensors(self, interventions: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Check ``{concept: value}`` and return ``(concept_mask, concept_values, applied)``, (1, M) each.

        Raises:
            ReviewError: for a model that takes no interventions, an unknown concept, or a value that is not a
                finite number within what the concept's unit allows.
        """
        specs = self.concept_specs
        mask, values = torch.zeros(1, len(specs), dtype=torch.bool), torch.zeros(1, len(specs))
        if interventions is None or interventions == {}:
            return mask, values, {}
        if not isinstance(interventions, Mapping):
            raise ReviewError(f"interventions: expected an object {{concept name: value}}, got {interventions!r}")
        if not self.accepts_interventions:
            raise ReviewError(f"interventions: {self.model.name} takes no concept interventions (concepts: "
                              f"{[s.name for s in specs]}); review a concept model such as cbm or cem to set them")
        columns = {spec.name: column for column, spec in enumerate(specs)}
        applied = {}
        for name, value in interventions.items():
            if name not in columns:
                raise ReviewError(f"interventions: unknown concept {name!r}; the model's concepts are {list(columns)}")
            spec = specs[columns[name]]
            low, high = unit_range(spec)
            unit = "0/1 or a probability" if spec.kind == "binary" else spec.unit or "no unit"
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ReviewError(f"interventions: concept {name!r}: expected a finite number ({unit}), got {value!r}")
            if not low <= value <= high:
                raise ReviewError(f"interventions: concept {name!r}: expected a value in [{low:g}, {high:g}] ({unit}), "
                                  f"got {value:g}")
            mask[0, columns[name]], values[0, columns[name]] = True, float(value)
            applied[name] = float(value)
        return mask, values, applied

    def _decision(self, logits: torch.Tensor | None) -> dict[str, Any]:
        if logits is None:
            return {"class": None, "class_index": None, "probabilities": []}
        p = probabilities(logits.detach().float().cpu().unsqueeze(0), self.task)[0]
        best = int(p.argmax())
        return {"class": self.class_names[best], "class_index": best,
                "probabilities": [{"class": n, "p": float(v)} for n, v in zip(self.class_names, p.tolist(),
                                                                            strict=False)]}

    def _concepts(self, output: Any, item: Mapping[str, Any], applied: Mapping[str, float]) -> list[dict[str, Any]]:
        if output.concept_logits is None or output.concept_logits.shape[1] != len(self.concept_specs):
            return []
        predicted = unit_values(output.concept_logits.float(), self.concept_specs)[0].cpu().tolist()
        truth = item.get("concepts")
        rows = []
        for column, spec in enumerate(self.concept_specs):
            true = None
            if truth is not None and truth.numel() == len(self.concept_specs):
                true = _finite(float(truth[column]))
            rows.append({"name": spec.name, "predicted": _finite(float(predicted[column])), "true": true,
                         "set": spec.name in applied})
        return rows

    def _top_prototypes(self, index: int, output: Any, image: torch.Tensor, applied: Mapping[str, float]
                        ) -> list[dict[str, Any]]:
        if self.prototype_classes is None or output.prototype_similarity is None or output.prototype_maps is None:
            return []
        cells, feature_size = self._peaks(index, None if applied else output)
        similarity = output.prototype_similarity[0].float().cpu()
        chosen = similarity.argsort(descending=True)[:TOP_PROTOTYPES].tolist()
        maps = upsample_evidence(output.prototype_maps[:, chosen].float(), image.shape[1:],
                                 self.model.localization_interpolation)
        maps = normalize_per_map(maps)[0].cpu()
        return [{"prototype": p, "class": self._prototype_class(p), "similarity": float(similarity[p]),
                 "has_source": self.provenance[p] is not None,
                 "views": [render.png_data_uri(v.overlay) for v in render.map_views(image, maps[row])],
                 "peak": self._peak(index, p, cells[p], feature_size, image.shape[1:])} for row, p in enumerate(chosen)]

    def _peak(self, index: int, prototype: int, cell: list[int], feature_size: Any, image_size: Any) -> dict[str, Any]:
        marked = self.corrections.activation_mark(prototype, self._id(index), cell)  # where it activates most
        return {"feature_index": cell, "image_box": image_box(cell, feature_size, image_size),
                "image_size": [int(size) for size in image_size],
                "mark": None if marked is None else marked.mark, "note": "" if marked is None else marked.note}

    def _id(self, index: int) -> str:
        return str(self.item(index).get("id", index))

    def _label(self, index: int) -> str | None:
        label = self.item(index).get("label")
        if not isinstance(label, torch.Tensor) or self.task == "segmentation":
            return None
        if label.ndim == 0:
            k = int(label)
            return self.class_names[k] if 0 <= k < len(self.class_names) else str(k)
        return ";".join(n for n, v in zip(self.class_names, label.tolist(), strict=False) if v >= 0.5) or "none"

    # ------------------------------------------------------------------------------------------- prototypes
    def _prototype_class(self, prototype: int) -> str | None:
        klass = self.prototype_classes[prototype]
        return self.class_names[klass] if 0 <= klass < len(self.class_names) else None

    def _check_prototype(self, prototype: Any) -> int:
        if self.provenance is None:
            raise ReviewError(f"prototype: {self.model.name} has no prototypes with sources (explanation protocol: "
                              "prototype_classes and prototype_provenance); review a prototype model such as "
                              "protopnet")
        return check_index(prototype, len(self.provenance), "prototype")

    def prototypes(self) -> list[dict[str, Any]]:
        """Every prototype: index, class, source (``None`` before push), pruned, its source's mark and note.

        ``activation_marks`` counts the marked patches where it activates, per mark.
        """
        if self.provenance is None:
            return []
        rows = []
        for p, source in enumerate(self.provenance):
            mark, patches = self.corrections.source_mark(p), self.corrections.activation_marks(p)
            rows.append({"prototype": p, "class": self._prototype_class(p),
                         "source": None if source is None else {k: source.get(k) for k in SOURCE_KEYS},
                         "pruned": None if source is None else source.get("pruned"),
                         "mark": None if mark is None else mark.mark, "note": "" if mark is None else mark.note,
                         "activation_marks": {m: sum(c.mark == m for c in patches) for m in ("forbid", "keep")}})
        return rows

    def prototype_png(self, prototype: Any) -> bytes:
        """PNG of a prototype's source patch: the training image, its activation and the patch box.

        3D: the three slices through the peak. Drawn by :func:`~pellucid.training.prototypes.gallery.build_gallery`.
        """
        prototype = self._check_prototype(prototype)
        if self.provenance[prototype] is None:
            raise ReviewError(f"prototype {prototype} has no source patch (not pushed yet)")
        if prototype not in self._sources:
            from pellucid.training.prototypes.gallery import build_gallery, overlay_rgb  # matplotlib's Agg backend

            with self._lock:
                self._check_source_sample(prototype)
                (entry,) = build_gallery(self.model, self._push_data, None, self.class_names, prototypes=[prototype])
            picture = render.join_views([render.enlarge(overlay_rgb(v), SOURCE_HEIGHT) for v in entry.source.views])
            self._sources[prototype] = render.png_bytes(picture)
        return self._sources[prototype]

    def _push_sample(self, index: int, expected: str) -> str | None:
        """``None`` when sample ``index`` of the data push reads is ``expected``, else what is there instead."""
        if self._push_data is None:
            self._push_data = push_dataset(self.datamodule)
        data = self._push_data
        found = str(data[index].get("id")) if 0 <= index < len(data) else None
        return None if found == expected else f"{found!r} there" if found is not None else f"{len(data)} samples"

    def _check_source_sample(self, prototype: int) -> None:
        """Refuse a source whose sample is not in the given data (other training data than the model's)."""
        index, expected = self.provenance[prototype]["sample_index"], str(self.provenance[prototype].get("sample_id"))
        found = self._push_sample(index, expected)
        if found:
            raise ReviewError(f"prototype {prototype}: its source is training sample {expected!r} at index {index}, "
                              f"but the given data's training split has {found}; review with the data the model was "
                              "trained on (e.g. --data-arg num_train=<its training size>)")

    # ------------------------------------------------------------------------------------------ corrections
    def corrections_state(self) -> dict[str, Any]:
        """The file's path, whether prototypes can be marked here, whether the file exists, its content and counts."""
        return self.corrections.state()

    def mark(self, prototype: Any, mark: Any, note: Any = "") -> dict[str, Any]:
        """Mark ``prototype``'s source patch ``"forbid"`` or ``"keep"`` (``None`` clears it) and write the file.

        Raises:
            ReviewError: for a model without prototypes, an index out of range, an unknown mark, a prototype without
                source, or a note that is not a short text.
        """
        prototype = self._check_prototype(prototype)
        mark, note = check_mark(mark), check_note(note)
        source = self.provenance[prototype]
        self.corrections.mark_source(prototype, mark, None if source is None else
                                     {k: source[k] for k in SOURCE_KEYS if k in source},
                                     self._prototype_class(prototype), note)
        return self.corrections_state()

    def activation_problem(self) -> str | None:
        """Why patches where prototypes activate cannot be marked in this review (``None`` when they can)."""
        if self.provenance is None:
            return f"{self.model.name} has no prototypes with sources"
        if self.split != "train":
            return (f"a patch where a prototype activates can be marked on training images only (the fine-tune's "
                    f"losses re-read them), this review shows the {self.split} split; review with --split train")
        return None

    def mark_activation(self, index: Any, prototype: Any, mark: Any, note: Any = "") -> dict[str, Any]:
        """Mark the patch of sample ``index`` where ``prototype`` activates most (``None`` clears it); write the file.

        The patch is the latent cell of the largest value of the model's ``prototype_maps[index, prototype]``; the
        entry (``where: activation``) names it by the sample's id, its index in the training data push reads
        (``sample_index``), the cell (``feature_index``) and its footprint (``image_box``).

        Returns:
            :meth:`corrections_state`, with ``marked``: the sample index, prototype, patch and mark.

        Raises:
            ReviewError: for bad values (as :meth:`mark`), a review of another split than ``train``, or training data
                whose push dataset holds another sample at that index.
        """
        index = check_index(index, self.count, "sample index")
        prototype = self._check_prototype(prototype)
        mark, note = check_mark(mark), check_note(note)
        problem = self.activation_problem()
        if problem:
            raise ReviewError(f"mark here: {problem}")
        with self._lock:
            patch = self.activation_patch(index, prototype)
            found = self._push_sample(index, patch["sample_id"])
        if found:  # the fine-tune looks the patch up there
            raise ReviewError(f"mark here: training sample {index} is {patch['sample_id']!r}, but the data push reads "
                              f"(push_dataset) has {found}; give data whose push_dataset is its training split")
        self.corrections.mark_activation(prototype, mark, patch, self._prototype_class(prototype), note)
        return {**self.corrections_state(),
                "marked": {"index": index, "prototype": prototype, "patch": patch, "mark": mark}}

    def activation_patch(self, index: int, prototype: int) -> dict[str, Any]:
        """The patch of sample ``index`` where ``prototype`` activates most: id, index, latent cell and image box."""
        cells, feature_size = self._peaks(index)
        image_size = self.item(index)["image"].shape[1:]
        return {"sample_id": self._id(index), "sample_index": index, "feature_index": cells[prototype],
                "image_box": image_box(cells[prototype], feature_size, image_size)}

    def _peaks(self, index: int, output: Any = None) -> tuple[list[list[int]], tuple[int, ...]]:
        """Per prototype the cell of its largest activation in sample ``index``, and the maps' size (kept)."""
        if index not in self._peak_cells:
            if output is None:
                image = self.item(index)["image"].float().unsqueeze(0).to(self.device)
                with self._lock, torch.no_grad():
                    output = self.model(image, explain=True)
            maps = output.prototype_maps[0]
            self._peak_cells[index] = (peak_cells(maps), tuple(maps.shape[1:]))
        return self._peak_cells[index]


def _slider(observed: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """A slider range for a continuous concept: the annotated values seen, widened by a quarter, within the unit's."""
    seen = observed[np.isfinite(observed)]
    if seen.size == 0:
        start, stop = (low, high) if math.isfinite(low) and math.isfinite(high) else (0.0, 1.0)
    else:
        start, stop = float(seen.min()), float(seen.max())
        margin = 0.25 * (stop - start) or 1.0
        start, stop = start - margin, stop + margin
    return max(start, low), min(stop, high)


def open_session(ckpt: str, data: str, corrections: str | Path, *, split: str = "test",
                 data_overrides: Mapping[str, Any] | None = None, limit: int | None = None,
                 device: str = "cpu") -> ReviewSession:
    """Load ``ckpt`` (a ``.ckpt``, zoo name or bundle folder) and ``data`` (a config with a ``data:`` section)."""
    from pellucid.training.outputs.report import load_datamodule, load_module  # the report's loading, one place

    return ReviewSession(load_module(ckpt), load_datamodule(data, data_overrides), corrections, checkpoint=str(ckpt),
                         data=str(data), split=split, limit=limit, device=device)


__all__ = ["ReviewError", "ReviewSession", "open_session", "push_dataset", "split_dataset"]
