"""``ExplanationWriter``: save every prediction's explanation to disk, atomically, resumably, once per sample.

``pellucid predict --config <experiment.yaml> --ckpt_path <ckpt> --trainer.callbacks+=ExplanationWriter
--trainer.callbacks.output_dir=<out>`` writes, for every sample:

- ``<out>/<id>.npz``: every ``ModelOutput`` tensor of the sample (``logits``, ``localization``,
  ``prototype_similarity``, ``prototype_maps``, ``concept_logits``, ``concept_maps``, ``segmentation``,
  ``attention_<i>``), plus ``probabilities``;
- for 3D inputs, ``<out>/<id>.<field>.nii.gz`` per spatial map, carrying the input's affine when the batch has one
  (see below);
- one row in ``<out>/index.csv``: id, npz file, the sha256 of the checkpoint file and of the weights, prediction,
  probability per class, the top prototypes with their similarity and provenance, and each concept's value with its
  unit in the column name.

One folder holds one model's explanations (:mod:`pellucid.training.outputs.writer_folder`): ``<out>/run.json`` records
the checkpoint and weights that own it; a rerun of the same weights resumes, another model is refused before anything
is written (``overwrite=True``, ``--trainer.callbacks.overwrite=true``, replaces the old explanations instead), and
``<out>/.writer.lock`` refuses a second writer while one runs (a lock whose process died is taken over).

Design (files are the only shared state, so it holds on one machine, under DDP and across restarts; the index
files are :mod:`pellucid.training.outputs.writer_index`):

- Atomic files: each file is written to a temporary name in the same folder (``.<name>.rank<r>.tmp``), flushed,
  fsync'ed and moved into place with ``os.replace``; a crash leaves no half ``<id>.npz``, only a temporary file that
  the next run of the same rank removes.
- Index shards: each process appends its rows to ``<out>/.index-shards/rank-<r>.jsonl`` (one JSON line per sample,
  flushed and fsync'ed per batch) *after* the sample's files are in place. At the end, rank 0 merges every shard into
  ``index.csv`` (atomic replace), one row per id.
- Resume: at start, the ids listed in any shard whose ``.npz`` exists count as done and are skipped; a torn last line
  (a crash mid-append) is dropped from the process's own shard. A rerun therefore never duplicates a row, and a
  sample whose file was written but whose row was not is written again (same content).
- DDP: Lightning's prediction loop shards the data without repeating samples (``UnrepeatedDistributedSampler``), so
  each sample is written by exactly one process; the merge still keeps one row per id (first shard wins).
  The output folder must be on a file system every process sees.

Batch convention extension: an optional ``affine`` key, (B, 4, 4), the voxel-to-world matrix of each input as its
NIfTI header gave it, with the tensor's spatial axes in the file's voxel order (i, j, k). Maps at input resolution get
that affine; feature-resolution maps (``prototype_maps``, ``concept_maps``, attention gates) get it scaled to their
coarser grid. Without ``affine``, ``nifti="auto"`` writes no NIfTI and ``nifti="always"`` uses the identity.

DICOM (``dicom=True``, inputs read from DICOM): a Segmentation of the predicted class's thresholded localization map
and colour Secondary Capture overlays per sample, on the source's pixel grid and referencing it
(:mod:`pellucid.training.outputs.dicom`; the batch's ``source`` names the file or series each input came from).
Interventions (``pellucid predict --interventions``, :mod:`pellucid.training.concepts.intervention_file`): a corrected
sample's row lists its corrections and its prediction without them; ``run.json`` records the file's sha256, so a
rerun with other corrections is refused like another model's.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter

from pellucid.models import ModelOutput
from pellucid.models.concepts import ConceptSpec, as_concept_spec
from pellucid.models.pretrained import sha256_of
from pellucid.training.concepts.intervention_file import intervention_columns, interventions_sha256
from pellucid.training.elements.families import concept_specs, prototype_provenance
from pellucid.training.metrics import probabilities
from pellucid.training.outputs.dicom import DICOM_OUTPUTS, DicomExport, DicomOutputError
from pellucid.training.outputs.writer_folder import (
    RUN_FILE,
    FolderLock,
    OutputFolderError,
    clear_explanations,
    describe_run,
    held_explanations,
    read_run_record,
    weights_sha256,
)
from pellucid.training.outputs.writer_index import (
    INDEX_FILE,
    SHARD_FOLDER,
    atomic_write,
    earlier_rows,
    merge_index,
    read_shard,
    shard_rows,
)

NiftiMode = Literal["auto", "always", "never"]
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(sample_id: str) -> str:
    """A file name for ``sample_id``: unsafe characters become ``_``, plus a short hash when anything changed."""
    cleaned = _SAFE_NAME.sub("_", sample_id).lstrip(".") or "_"
    if cleaned != sample_id:
        cleaned += "-" + hashlib.sha1(sample_id.encode()).hexdigest()[:8]
    return cleaned


def feature_affine(affine: np.ndarray, input_size: Sequence[int], map_size: Sequence[int]) -> np.ndarray:
    """The affine of a coarser map covering the same field of view: voxel ``j`` centred at input ``(j+0.5)f-0.5``."""
    scale = np.asarray(input_size, dtype=np.float64) / np.asarray(map_size, dtype=np.float64)
    grid = np.eye(4)
    grid[:3, :3] = np.diag(scale)
    grid[:3, 3] = (scale - 1.0) / 2.0
    return affine @ grid


class ExplanationWriter(BasePredictionWriter):
    """Write each predicted sample's explanation (npz, NIfTI for 3D) and one index row (see the module docstring).

    Args:
        output_dir: Folder for the explanations (created).
        top_k_prototypes: Prototypes listed per sample in the index (by similarity).
        nifti: ``"auto"``: 3D maps as NIfTI when the batch carries ``affine``; ``"always"``: 3D maps as NIfTI, identity
            affine when the batch has none; ``"never"``.
        save_image: Also store the input ``image`` in each npz.
        class_names: Class names for the index (default: the module's ``class_names``).
        overwrite: Remove the explanations the folder holds (files, index, shards, record) and write afresh. Off:
            a rerun of the same weights resumes, and explanations of other weights refuse the run.
        dicom: Also write each explanation as DICOM (Segmentation and overlay); every input must be DICOM.
        dicom_threshold: The Segmentation marks where the predicted class's map is at least this (its peak is 1).
        dicom_outputs: ``["segmentation", "overlay"]`` or one of them.

    Prototype provenance: when the model's ``prototype_provenance()`` (explanation protocol of
    :class:`~pellucid.models.InterpretableModel`; prototype networks return push's record) gives one
    JSON-serialisable entry (or ``None``) per prototype (e.g. the training sample, location and class its patch came
    from), each listed prototype carries its entry; otherwise the provenance column is empty.
    """

    def __init__(self, output_dir: str | Path, top_k_prototypes: int = 3, nifti: NiftiMode = "auto",
                 save_image: bool = False, class_names: list[str] | None = None, overwrite: bool = False,
                 dicom: bool = False, dicom_threshold: float = 0.5, dicom_outputs: list[str] | None = None) -> None:
        super().__init__(write_interval="batch")
        if nifti not in ("auto", "always", "never"):
            raise ValueError(f"ExplanationWriter: nifti must be 'auto', 'always' or 'never', got {nifti!r}")
        if top_k_prototypes < 0:
            raise ValueError(f"ExplanationWriter: top_k_prototypes must be >= 0, got {top_k_prototypes}")
        self.output_dir = Path(output_dir)
        self.top_k_prototypes, self.nifti, self.save_image = top_k_prototypes, nifti, save_image
        self.class_names, self.overwrite = class_names, overwrite
        self.dicom = DicomExport(dicom_threshold, DICOM_OUTPUTS if dicom_outputs is None else dicom_outputs) \
            if dicom else None
        self.lock = FolderLock(self.output_dir)
        self.identity: dict[str, Any] = {}
        self.rank = 0
        self.done: set[str] = set()
        self.written = 0

    # ----------------------------------------------------------------------------------------- lifecycle
    @property
    def shard_path(self) -> Path:
        """This process's index shard."""
        return self.output_dir / SHARD_FOLDER / f"rank-{self.rank:05d}.jsonl"

    @property
    def index_path(self) -> Path:
        """The merged index file."""
        return self.output_dir / INDEX_FILE

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Claim the folder, clean this rank's crash leftovers, and collect the ids already written.

        Raises:
            OutputFolderError: on every rank, before anything is written, when the folder holds another model's
                explanations (and ``overwrite`` is off) or another writer holds its lock.
        """
        self.rank = trainer.global_rank
        if self.dicom is not None:
            self.dicom.check_inputs(trainer)  # every input is DICOM, before the folder is claimed
        claim = self._claim(trainer, pl_module) if trainer.is_global_zero else None
        self.identity, problem = trainer.strategy.broadcast(claim, src=0)
        if problem:
            raise OutputFolderError(problem)
        (self.output_dir / SHARD_FOLDER).mkdir(parents=True, exist_ok=True)
        for leftover in self.output_dir.glob(f".*.rank{self.rank}.tmp"):
            leftover.unlink()
        if self.shard_path.exists():  # drop a torn last line before appending after it
            rows = read_shard(self.shard_path)
            text = "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8")
            atomic_write(self.shard_path, lambda handle: handle.write(text), f"rank{self.rank}")
        trainer.strategy.barrier()  # every rank's shard is whole before anyone reads it
        self.done = {row["id"] for row in shard_rows(self.output_dir) if (self.output_dir / row["file"]).exists()}
        self.written = 0
        hparams = getattr(pl_module, "hparams", {})
        self._class_names = self.class_names or hparams.get("class_names")
        model = getattr(pl_module, "model", pl_module)
        self._concepts = [as_concept_spec(c) for c in concept_specs(model) or hparams.get("concepts")
                          or []]
        self._task = getattr(pl_module, "task", "multiclass")
        self._provenance = prototype_provenance(model)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Rank 0 merges every shard into ``index.csv`` once all processes are done, then releases the lock."""
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            index = merge_index(self.output_dir, f"rank{self.rank}")
            count = max(0, len(index.read_text(encoding="utf-8").splitlines()) - 1)
            print(f"explanations of {count} sample(s) in {self.output_dir} (one row each in {index})")
        trainer.strategy.barrier()
        self.lock.release()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Release the lock: a failed run can be rerun (and resumes)."""
        self.lock.release()

    # ---------------------------------------------------------------------------------------- ownership
    def run_identity(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """What ``run.json`` records: the weights' and the checkpoint's sha256, the model and its classes."""
        checkpoint = trainer.ckpt_path
        checkpoint = Path(checkpoint) if checkpoint and Path(checkpoint).is_file() else None
        hparams = getattr(pl_module, "hparams", {})
        return {"writer": f"{__name__}.{type(self).__name__}", "weights_sha256": weights_sha256(pl_module),
                "checkpoint": None if checkpoint is None else str(checkpoint.resolve()),
                "checkpoint_sha256": None if checkpoint is None else sha256_of(checkpoint),
                "model": hparams.get("model"), "class_names": self.class_names or hparams.get("class_names"),
                "interventions_sha256": interventions_sha256(trainer)}

    def _claim(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[dict[str, Any], str | None]:
        """Rank 0: lock the folder; resume, refuse or clear an earlier run; record this run. Returns any refusal."""
        identity = self.run_identity(trainer, pl_module)
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
            self._take_over(identity)
        except OutputFolderError as error:
            self.lock.release()
            return identity, str(error)
        except OSError as error:  # told to every rank (rank 0 raising alone would leave the others waiting)
            self.lock.release()
            return identity, (f"ExplanationWriter: cannot write to output folder {self.output_dir} "
                              f"({type(error).__name__}: {error}); choose a folder you can write to "
                              "(--trainer.callbacks.output_dir=<folder>)")
        return identity, None

    def _take_over(self, identity: dict[str, Any]) -> None:
        record = read_run_record(self.output_dir)
        held = held_explanations(self.output_dir)
        same = record is not None and all(record.get(key) == identity[key]
                                          for key in ("weights_sha256", "interventions_sha256"))
        if held and same and not self.overwrite:
            return  # the same weights: resume
        if held and not self.overwrite:
            other = "another model" if record is None or record.get("weights_sha256") != identity["weights_sha256"] \
                else "the same weights under other interventions (--interventions)"
            raise OutputFolderError(
                f"ExplanationWriter: output folder {self.output_dir} already holds explanations of {other} "
                f"({held}, written by {describe_run(record)}; this run's weights have sha256 "
                f"{identity['weights_sha256'][:16]}...); refusing to mix two models in one folder: write to another "
                "folder (--trainer.callbacks.output_dir=<new folder>) or replace them with "
                "--trainer.callbacks.overwrite=true")
        if held:
            clear_explanations(self.output_dir, earlier_rows(self.output_dir))
        text = (json.dumps(identity, indent=2) + "\n").encode("utf-8")
        atomic_write(self.output_dir / RUN_FILE, lambda handle: handle.write(text), f"rank{self.rank}")

    # --------------------------------------------------------------------------------------------- batch
    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        """Write the batch's new samples, then append their rows to this rank's shard."""
        if not isinstance(prediction, ModelOutput):
            raise TypeError(f"ExplanationWriter expects predict_step to return a ModelOutput, "
                            f"got {type(prediction).__name__}")
        output = prediction.cpu()
        ids = list(output.ids or batch["id"])
        probs = probabilities(output.logits.float(), self._task) if output.logits is not None else None
        affines = batch.get("affine") if isinstance(batch, Mapping) else None
        images = batch["image"].detach().cpu() if self.save_image or affines is not None or self.nifti != "never" \
            else None
        lines = []
        for index, sample_id in enumerate(ids):
            if sample_id in self.done:
                continue
            name = safe_name(sample_id)
            arrays = {key.replace(".", "_"): tensor[index].float().numpy() for key, tensor in output.tensors()}
            if probs is not None:
                arrays["probabilities"] = probs[index].numpy()
            if self.save_image:
                arrays["image"] = images[index].float().numpy()
            atomic_write(self.output_dir / f"{name}.npz", lambda handle, a=arrays: np.savez_compressed(handle, **a),
                         f"rank{self.rank}")
            nifti_files = self._write_nifti(name, output, index, images, affines)
            row = self._row(sample_id, f"{name}.npz", nifti_files, output, probs, index)
            row.update(intervention_columns(batch, index, self._class_names, self._task))
            if self.dicom is not None:
                row["dicom"] = self._write_dicom(name, batch, index, output)
            lines.append(json.dumps(row) + "\n")
            self.done.add(sample_id)
        if lines:
            with open(self.shard_path, "a", encoding="utf-8") as handle:
                handle.write("".join(lines))
                handle.flush()
                os.fsync(handle.fileno())
            self.written += len(lines)

    def _write_dicom(self, name: str, batch: Any, index: int, output: ModelOutput) -> list[str]:
        """The predicted class's localization map as DICOM (multi-label: the most probable class)."""
        if output.localization is None or output.logits is None:
            raise DicomOutputError(f"ExplanationWriter: dicom output writes the predicted class's localization map, "
                                   f"and {self.identity.get('model')} makes none; fix: turn off dicom "
                                   "(--trainer.callbacks.dicom=false)")
        predicted = int(output.logits[index].argmax())
        names = self._class_names or []
        return self.dicom.write(self.output_dir, name, batch, index, output.localization[index, predicted].numpy(),
                                str(names[predicted]) if predicted < len(names) else str(predicted), self.identity,
                                lambda path, data: atomic_write(path, lambda handle: handle.write(data),
                                                                f"rank{self.rank}"))

    def _write_nifti(self, name: str, output: ModelOutput, index: int, images: torch.Tensor | None,
                     affines: Any) -> list[str]:
        if self.nifti == "never" or images is None or images.ndim != 5 or (affines is None and self.nifti == "auto"):
            return []
        import nibabel  # imported here: only 3D NIfTI output needs it (not a core dependency)

        affine = np.eye(4) if affines is None else np.asarray(torch.as_tensor(affines)[index], dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"batch['affine']: expected (B, 4, 4) matrices, got {affine.shape} for one sample")
        input_size = tuple(images.shape[2:])
        files = []
        for key, tensor in output.tensors():
            if tensor.ndim != 5:
                continue
            maps = tensor[index].float().numpy()  # (C, i, j, k)
            map_affine = affine if tuple(maps.shape[1:]) == input_size else feature_affine(affine, input_size,
                                                                                           maps.shape[1:])
            volume = np.moveaxis(maps, 0, -1)
            volume = volume[..., 0] if volume.shape[-1] == 1 else volume
            file_name = f"{name}.{key.replace('.', '_')}.nii.gz"
            content = gzip.compress(nibabel.Nifti1Image(volume.astype(np.float32), map_affine).to_bytes(), mtime=0)
            atomic_write(self.output_dir / file_name, lambda handle, c=content: handle.write(c), f"rank{self.rank}")
            files.append(file_name)
        return files

    def _row(self, sample_id: str, file_name: str, nifti_files: list[str], output: ModelOutput,
             probs: torch.Tensor | None, index: int) -> dict[str, Any]:
        row: dict[str, Any] = {"id": sample_id, "file": file_name, "nifti": nifti_files,
                               "checkpoint_sha256": self.identity.get("checkpoint_sha256"),
                               "weights_sha256": self.identity.get("weights_sha256")}
        if probs is not None:
            names = self._class_names or [str(k) for k in range(probs.shape[1])]
            p = probs[index]
            if self._task == "multilabel":
                row["prediction"] = ";".join(n for n, v in zip(names, p.tolist(), strict=False) if v >= 0.5)
            else:
                row["prediction"] = names[int(p.argmax())]
                row["predicted_index"] = int(p.argmax())
            row["probabilities"] = {n: float(v) for n, v in zip(names, p.tolist(), strict=False)}
        if output.prototype_similarity is not None and self.top_k_prototypes:
            similarity = output.prototype_similarity[index]
            top = similarity.topk(min(self.top_k_prototypes, similarity.numel()))
            row["prototypes"] = [{"prototype": int(j), "similarity": float(s),
                                  "provenance": self._provenance_of(int(j))}
                                 for s, j in zip(top.values.tolist(), top.indices.tolist(), strict=True)]
        if output.concept_logits is not None:
            row["concepts"] = concept_values(output.concept_logits[index], self._concepts)
        return row

    def _provenance_of(self, prototype: int) -> Any:
        if self._provenance is None or prototype >= len(self._provenance):
            return None
        return self._provenance[prototype]


def concept_values(concept_logits: torch.Tensor, specs: Sequence[ConceptSpec]) -> list[dict[str, Any]]:
    """Concepts as ``{name, value, unit}``: binary as a probability, continuous in its unit (``c<i>`` if unnamed)."""
    values = []
    for column, logit in enumerate(concept_logits.tolist()):
        spec = specs[column] if column < len(specs) else ConceptSpec(f"c{column}", "continuous")
        if spec.kind == "binary":
            values.append({"name": spec.name, "value": float(torch.sigmoid(torch.tensor(logit))),
                           "unit": "probability"})
        else:
            values.append({"name": spec.name, "value": float(logit), "unit": spec.unit})
    return values


