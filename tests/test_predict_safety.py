"""Issue 21, cases 1 and 3: ``pellucid predict`` never mixes models in one folder and serves the checkpoint's classes.

Case 1: a folder holding another model's explanations is refused before anything is written (or replaced cleanly
with ``--trainer.callbacks.overwrite=true``); a lock refuses a second writer; the index records the checkpoint's
sha256; a rerun of the same checkpoint still resumes. Case 3: the class names and their number come from the
checkpoint, so a manifest without labels or with a subset of the classes predicts, and an unknown label is one error.

Two tiny black-box checkpoints (seeds 0 and 1) are trained once on the 2D example folder (real DICOM, PNG and JPEG
files that pydicom and scikit-image ship), then every test predicts through the ``pellucid`` entry point.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from synthetic import RandomDataModule
from test_module import trainer

from pellucid.training import InterpretableModule
from pellucid.training.cli import main
from pellucid.training.data.example_data import write_example_2d
from pellucid.training.data.manifest_rows import ManifestError
from pellucid.training.outputs.writer import ExplanationWriter
from pellucid.training.outputs.writer_folder import LOCK_FILE, RUN_FILE, OutputFolderError
from pellucid.training.outputs.writer_index import read_index

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--trainer.max_epochs=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--trainer.logger=false"]
TINY = ["--model.model_kwargs.backbone_kwargs.channels=[4,8]", "--model.model_kwargs.backbone_kwargs.strides=[2,2]"]
CLASSES = ["ct", "fundus"]  # what the 2D example is labelled with, hence the checkpoints' classes


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> dict[str, Path]:
    """The 2D example folder and two checkpoints trained on it with different seeds."""
    base = tmp_path_factory.mktemp("predict_safety")
    manifest = write_example_2d(base / "own2d")
    found = {"base": base, "manifest": manifest}
    for seed in (0, 1):
        main(["fit", *config(manifest), f"--seed_everything={seed}", f"--trainer.default_root_dir={base}/fit{seed}",
              *TINY, *QUICK])
        (found[f"ckpt{seed}"],) = sorted((base / f"fit{seed}").rglob("*.ckpt"))[:1]
    return found


def config(manifest: Path) -> list[str]:
    return ["--config", str(ROOT / "docs/examples/own_data_2d.yaml"), f"--data.init_args.manifest={manifest}"]


def predict(manifest: Path, checkpoint: Path, out: Path, *extra: str) -> None:
    main(["predict", *config(manifest), "--config", str(ROOT / "configs/predict/explanations.yaml"),
          f"--trainer.callbacks.output_dir={out}", f"--ckpt_path={checkpoint}",
          f"--trainer.default_root_dir={out.parent}", *TINY, *QUICK, *extra])


def refusal(capsys: pytest.CaptureFixture, call: Callable[[], None], error: type[Exception]) -> str:
    """The one-line message of a refused command: the exception's, or what ``main`` printed for a user error."""
    try:
        call()
    except error as raised:
        return str(raised)
    except SystemExit as stop:
        assert stop.code == 1
        return capsys.readouterr().err.strip()
    raise AssertionError("the command was not refused")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def write_manifest(example: dict[str, Path], name: str, keep: Callable[[dict[str, str]], bool],
                   label: Callable[[dict[str, str]], str | None]) -> Path:
    """A manifest of the example's rows that ``keep`` selects, labelled by ``label`` (``None``: no label column)."""
    with example["manifest"].open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if keep(row)]
    for row in rows:
        value = label(row)
        row.pop("label")
        if value is not None:
            row["label"] = value
    path = example["manifest"].with_name(name)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def unlabelled(example: dict[str, Path], keep: Callable[[dict[str, str]], bool] = lambda row: True) -> Path:
    return write_manifest(example, "unlabelled.csv", keep, lambda row: None)


# ------------------------------------------------------------------------------------------------------- case 1
def test_case1_predict_into_another_models_folder_is_refused_before_anything_is_written(example, capsys) -> None:
    out = example["base"] / "case1_refused"
    manifest = example["manifest"]
    predict(manifest, example["ckpt0"], out)
    before = snapshot(out)
    assert any(name.endswith(".npz") for name in before) and "index.csv" in before

    message = refusal(capsys, lambda: predict(manifest, example["ckpt1"], out), OutputFolderError)
    assert "\n" not in message
    assert str(out) in message and "already holds explanations of another model" in message
    assert sha256(example["ckpt0"])[:16] in message  # which checkpoint wrote the folder
    assert "--trainer.callbacks.overwrite=true" in message and "--trainer.callbacks.output_dir" in message
    assert snapshot(out) == before  # nothing written, nothing removed, no lock left behind


def test_case1_overwrite_replaces_the_old_explanations_cleanly(example) -> None:
    out = example["base"] / "case1_overwrite"
    predict(example["manifest"], example["ckpt0"], out, "--data.init_args.test_fraction=0.6")
    (out / "notes.txt").write_text("the user's own file")
    old_ids = {row["id"] for row in read_index(out)}

    predict(example["manifest"], example["ckpt1"], out, "--trainer.callbacks.overwrite=true")
    rows = read_index(out)
    new_ids = {row["id"] for row in rows}
    assert new_ids and old_ids - new_ids  # the old run had samples this one does not predict
    assert {p.name for p in out.glob("*.npz")} == {row["file"] for row in rows}  # none of the old run's files left
    assert {row["checkpoint_sha256"] for row in rows} == {sha256(example["ckpt1"])}
    assert json.loads((out / RUN_FILE).read_text())["checkpoint_sha256"] == sha256(example["ckpt1"])
    assert (out / "notes.txt").read_text() == "the user's own file"  # only what a writer writes goes
    assert not (out / LOCK_FILE).exists()


def test_case1_the_index_records_the_checkpoint_sha256_and_a_rerun_of_it_resumes(example, capsys) -> None:
    out = example["base"] / "case1_resume"
    manifest = example["manifest"]
    predict(manifest, example["ckpt0"], out)
    rows = read_index(out)
    assert f"explanations of {len(rows)} sample(s) in {out}" in capsys.readouterr().out  # case 11: says where
    assert {row["checkpoint_sha256"] for row in rows} == {sha256(example["ckpt0"])}
    assert len({row["weights_sha256"] for row in rows}) == 1

    # a killed run: one sample's file never appeared, the index was never merged
    (out / rows[-1]["file"]).unlink()
    (out / "index.csv").unlink()
    kept = {row["file"]: os.stat(out / row["file"]).st_mtime_ns for row in rows[:-1]}
    predict(manifest, example["ckpt0"], out)  # the same checkpoint: resumed, not refused
    assert sorted(row["id"] for row in read_index(out)) == sorted(row["id"] for row in rows)
    assert (out / rows[-1]["file"]).is_file()
    assert {name: os.stat(out / name).st_mtime_ns for name in kept} == kept  # done samples are not written again


def _writer_predict(tmp_path: Path, out: Path) -> ExplanationWriter:
    torch.manual_seed(0)
    module = InterpretableModule(model="blackbox", spatial_dims=2, in_channels=1, num_classes=3,
                                 model_kwargs={"backbone_kwargs": {"channels": [4], "strides": [2]}})
    writer = ExplanationWriter(out)
    trainer(tmp_path, callbacks=[writer]).predict(
        module, datamodule=RandomDataModule(spatial_dims=2, num_samples=4, batch_size=2), return_predictions=False)
    return writer


def test_case1_a_held_lock_refuses_a_second_writer_and_a_dead_holders_lock_is_taken_over(tmp_path) -> None:
    out = tmp_path / "explanations"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = out / LOCK_FILE
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "earlier"}))
        with pytest.raises(OutputFolderError) as refused:
            _writer_predict(tmp_path, out)
        message = str(refused.value)
        assert "\n" not in message and str(lock) in message and f"pid {holder.pid}" in message
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    assert _writer_predict(tmp_path, out).written == 4  # the holder is gone: its lock is stale and taken over
    assert not lock.exists()
    assert len(read_index(out)) == 4


# ------------------------------------------------------------------------------------------------------- case 3
def test_case3_an_unlabelled_manifest_predicts_every_row_with_the_checkpoints_class_names(example) -> None:
    out = example["base"] / "case3_unlabelled"
    manifest = unlabelled(example)
    predict(manifest, example["ckpt0"], out)
    rows = read_index(out)
    with manifest.open(newline="") as handle:
        assert len(rows) == len(list(csv.DictReader(handle)))  # every unlabelled row is one to predict
    assert [c for c in rows[0] if c.startswith("prob:")] == [f"prob:{name}" for name in CLASSES]
    assert {row["prediction"] for row in rows} <= set(CLASSES)


def test_case3_a_subset_of_the_classes_keeps_the_checkpoints_classes_and_indices(example) -> None:
    full, subset = example["base"] / "case3_full", example["base"] / "case3_subset"
    predict(unlabelled(example), example["ckpt0"], full)
    fundus = write_manifest(example, "fundus_only.csv", lambda row: row["label"] == "fundus",
                            lambda row: "fundus")
    predict(fundus, example["ckpt0"], subset, "--data.init_args.test_fraction=0.5")
    by_id = {row["id"]: row for row in read_index(full)}
    rows = read_index(subset)
    assert rows
    for row in rows:
        assert [c for c in row if c.startswith("prob:")] == [f"prob:{name}" for name in CLASSES]
        assert {c: row[c] for c in row if c.startswith("prob:")} == \
            {c: by_id[row["id"]][c] for c in row if c.startswith("prob:")}  # the same image, the same named classes


def test_case3_labels_the_checkpoint_does_not_know_are_one_error_naming_row_label_and_classes(example, capsys) -> None:
    other = write_manifest(example, "other_labels.csv", lambda row: True,
                           lambda row: "coins" if row["label"] == "ct" else "camera")
    out = example["base"] / "case3_other"
    message = refusal(capsys, lambda: predict(other, example["ckpt0"], out), ManifestError)
    assert "unknown label 'coins'" in message and "row 1 (id 'ct_0')" in message
    assert str(CLASSES) in message
    assert not out.exists() or not list(out.glob("*.npz"))
