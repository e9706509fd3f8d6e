"""Who owns an explanation folder: the run record, the lock against a second writer, and a clean overwrite.

:class:`~pellucid.training.outputs.writer.ExplanationWriter` writes one model's explanations per folder:

- ``<out>/run.json`` records the run that owns the folder: the sha256 of the weights the explanations came from
  (:func:`weights_sha256`, a hash of the state dict's tensors, not of any file: the identity compared on every
  start), the checkpoint file and its sha256 when ``predict``
  was given ``--ckpt_path``, the model's name and its classes. Every index row carries the same two hashes.
- A start whose weights match the record resumes (a killed run completes, nothing is written twice); any other start
  into a folder that holds explanations is refused with one line (:class:`OutputFolderError`) before anything is
  written. ``overwrite=True`` removes the old run's files first (:func:`clear_explanations`) and writes afresh.
- ``<out>/.writer.lock`` (created with ``O_EXCL``; pid, host and start time inside) refuses a second concurrent
  writer, naming the lock and the pid that holds it. A lock whose process is gone (same host, dead pid) is stale and
  taken over: a ``kill -9`` never leaves a folder locked for good.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from pellucid.training.outputs.writer_index import INDEX_FILE, SHARD_FOLDER

RUN_FILE = "run.json"
LOCK_FILE = ".writer.lock"


class OutputFolderError(RuntimeError):
    """The explanation folder cannot be written: it holds another run's explanations, or another writer holds it."""


def weights_sha256(module: torch.nn.Module) -> str:
    """The sha256 of a module's state, device-independent.

    Every parameter and buffer (name, dtype, shape and bytes) and any extra state a layer keeps (e.g. push's record
    of prototype sources), walked through its dicts and lists.
    """
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        digest.update(f"{name}=".encode())
        _hash_value(digest, value)
    return digest.hexdigest()


def _hash_value(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"tensor|{data.dtype}|{tuple(value.shape)}|".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        digest.update(b"{")
        for key in sorted(value, key=str):
            digest.update(f"{key}:".encode())
            _hash_value(digest, value[key])
        digest.update(b"}")
    elif isinstance(value, list | tuple):
        digest.update(b"[")
        for item in value:
            _hash_value(digest, item)
        digest.update(b"]")
    else:
        digest.update(f"{type(value).__name__}|{value!r};".encode())


def read_run_record(folder: Path) -> dict[str, Any] | None:
    """The folder's ``run.json``, or ``None`` when there is none or it is unreadable."""
    try:
        record = json.loads((folder / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def describe_run(record: Mapping[str, Any] | None) -> str:
    """The run that wrote a folder, in words (checkpoint and its sha256, or the weights' sha256)."""
    if record is None:
        return "an unknown model (no run.json: written before pellucid recorded the model)"
    parts = [f"model {record.get('model') or '?'}"]
    if record.get("checkpoint"):
        parts.append(f"checkpoint {record['checkpoint']} (sha256 {str(record.get('checkpoint_sha256'))[:16]}...)")
    parts.append(f"weights sha256 {str(record.get('weights_sha256'))[:16]}...")
    return ", ".join(parts)


def listed_files(folder: Path, rows: Iterable[Mapping[str, Any]]) -> set[Path]:
    """The explanation files (npz, NIfTI, DICOM) that index rows name, inside ``folder`` only."""
    names: set[str] = set()
    for row in rows:
        names.add(str(row.get("file") or ""))
        for column in ("nifti", "dicom"):
            listed = row.get(column) or []
            names.update(listed.split(";") if isinstance(listed, str) else listed)
    inside = {folder / name for name in names if name and Path(name).name == name}
    return {path for path in inside if path.is_file()}


def explanation_files(folder: Path, rows: Iterable[Mapping[str, Any]]) -> set[Path]:
    """Every file a writer left: listed files, each ``.npz`` with its NIfTI/DICOM files, index, record, temps."""
    files = listed_files(folder, rows) | set(folder.glob("*.npz")) | set(folder.glob(".*.tmp"))
    for npz in list(folder.glob("*.npz")):
        stem = npz.name[: -len(".npz")]
        files |= set(folder.glob(f"{stem}.*.nii.gz")) | set(folder.glob(f"{stem}.*.dcm"))
    files |= {path for path in (folder / INDEX_FILE, folder / RUN_FILE) if path.is_file()}
    return files


def clear_explanations(folder: Path, rows: Iterable[Mapping[str, Any]]) -> int:
    """Remove a previous run's explanations from ``folder`` (its files, index, shards and record); return how many.

    Only what a writer writes goes: other files in the folder stay.
    """
    files = explanation_files(folder, rows)
    shards = folder / SHARD_FOLDER
    files |= set(shards.glob("*")) if shards.is_dir() else set()
    for path in files:
        path.unlink(missing_ok=True)
    if shards.is_dir():
        shards.rmdir()
    return len(files)


def _holder(lock: Path) -> dict[str, Any] | None:
    """The lock's content; ``None`` when it is unreadable (being written, or torn by a crash)."""
    for _ in range(2):
        try:
            content = json.loads(lock.read_text(encoding="utf-8"))
            return content if isinstance(content, dict) else None
        except FileNotFoundError:
            raise
        except (OSError, ValueError):
            time.sleep(0.05)  # a writer between O_EXCL and its write
    return None


def holder_alive(holder: Mapping[str, Any] | None) -> bool:
    """Whether the process named by a lock still runs (a lock from another host counts as alive: it cannot be told)."""
    if holder is None:
        return False
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():  # our own pid: an earlier run of this process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class FolderLock:
    """An exclusive lock file in an explanation folder (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        """Create the lock, taking over a stale one.

        Raises:
            OutputFolderError: naming the lock, the pid and host that hold it, and what to do.
        """
        content = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        for _ in range(5):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                handle.write(content)
                handle.flush()
                os.fsync(handle.fileno())
            self.held = True
            return
        raise OutputFolderError(f"ExplanationWriter: could not take the lock {self.path} (it changed hands 5 times); "
                                "another writer is starting in the same folder; retry, or write to another folder")

    def _take_over_if_stale(self) -> None:
        try:
            holder = _holder(self.path)
        except FileNotFoundError:  # released meanwhile: try again
            return
        if holder_alive(holder):
            where = f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('started')}"
            raise OutputFolderError(
                f"ExplanationWriter: output folder {self.path.parent} is being written by another predict (lock "
                f"{self.path} held by {where}); wait for it to finish, write to another folder "
                f"(--trainer.callbacks.output_dir=<new folder>), or delete {self.path} if that process is not a "
                "pellucid predict")
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:  # another process took it over first
            return
        try:
            if _holder(aside) != holder:  # we moved a fresh lock taken meanwhile: put it back
                os.link(aside, self.path)
        except (FileNotFoundError, FileExistsError):
            pass
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock if this object holds it."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def held_explanations(folder: Path) -> str:
    """What of an earlier run ``folder`` holds, in words ("" when nothing)."""
    npz = len(list(folder.glob("*.npz")))
    shards = [p for p in (folder / SHARD_FOLDER).glob("rank-*.jsonl") if p.stat().st_size]
    held = [f"{npz} .npz file(s)"] if npz else []
    held += [name for name, present in ((INDEX_FILE, (folder / INDEX_FILE).is_file()),
                                        (f"{len(shards)} index shard(s)", bool(shards)),
                                        (RUN_FILE, (folder / RUN_FILE).is_file())) if present]
    return ", ".join(held)
