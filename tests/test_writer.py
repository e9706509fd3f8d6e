"""ExplanationWriter: files per sample, one index row per sample, atomic writes, resume, NIfTI affine, DDP."""

from __future__ import annotations

import json

import nibabel
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from explain_toys import (
    single_threaded,  # noqa: F401 - a fixture, used through pytestmark
    toy_transparent,
)
from synthetic import RandomDataModule
from torch.utils.data import DataLoader, Dataset

from pellucid.models.prototypes import PrototypeSource
from pellucid.training import InterpretableModule
from pellucid.training.outputs.writer import ExplanationWriter, feature_affine
from pellucid.training.outputs.writer_folder import RUN_FILE, OutputFolderError
from pellucid.training.outputs.writer_index import SHARD_FOLDER, read_index, read_shard

NUM_SAMPLES = 8


pytestmark = pytest.mark.usefixtures("single_threaded")
def predict(tmp_path, out, spatial_dims=2, data=None, **writer_options) -> ExplanationWriter:
    torch.manual_seed(0)
    module = InterpretableModule(model="blackbox", spatial_dims=spatial_dims, in_channels=1, num_classes=3,
                                 class_names=["normal", "benign", "malignant"],
                                 model_kwargs={"backbone_kwargs": {"channels": [4, 8], "strides": [2, 2]}})
    writer = ExplanationWriter(out, **writer_options)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tmp_path, callbacks=[writer])
    data = data or RandomDataModule(spatial_dims=spatial_dims, num_samples=NUM_SAMPLES, batch_size=3)
    trainer.predict(module, datamodule=data, return_predictions=False)
    return writer


def shard_rows(out) -> list[dict]:
    return [row for shard in sorted((out / SHARD_FOLDER).glob("*.jsonl")) for row in read_shard(shard)]


def test_every_sample_gets_its_explanation_file_and_one_index_row(tmp_path) -> None:
    out = tmp_path / "explanations"
    predict(tmp_path, out)
    rows = read_index(out)
    ids = [f"sample-0-{i}" for i in range(NUM_SAMPLES)]
    assert sorted(row["id"] for row in rows) == sorted(ids)
    for row in rows:
        with np.load(out / row["file"]) as saved:
            assert saved["localization"].shape == (3, 32, 32)
            assert saved["logits"].shape == (3,)
            np.testing.assert_allclose(saved["probabilities"].sum(), 1.0, rtol=1e-5)
        probabilities = [float(row[f"prob:{name}"]) for name in ("normal", "benign", "malignant")]
        assert row["prediction"] == ["normal", "benign", "malignant"][int(np.argmax(probabilities))]
    assert not list(out.glob(".*.tmp"))


def test_rows_list_the_top_prototypes_with_provenance_and_the_concepts_with_units(tmp_path) -> None:
    out = tmp_path / "explanations"
    module = InterpretableModule(toy_transparent(2), task="multiclass")
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ExplanationWriter(out, top_k_prototypes=2)], default_root_dir=tmp_path)
    trainer.predict(module, datamodule=RandomDataModule(spatial_dims=2, num_samples=3), return_predictions=False)
    for row in read_index(out):
        with np.load(out / row["file"]) as saved:
            similarity = saved["prototype_similarity"]
            assert {"prototype_maps", "concept_logits", "concept_maps", "attention_0"} <= set(saved.files)
        best = np.argsort(-similarity)[:2]
        assert [int(row["prototype_1"]), int(row["prototype_2"])] == best.tolist()
        assert json.loads(row["prototype_1_provenance"]) == {"sample_id": f"train-{best[0]}", "class": int(best[0]) % 3}
        assert "prototype_3" not in row
        assert 0.0 <= float(row["concept:a [probability]"]) <= 1.0
        assert "concept:b [mm]" in row


def test_a_crash_mid_write_leaves_no_partial_file_and_the_rerun_completes_without_duplicates(
        tmp_path, monkeypatch) -> None:
    out = tmp_path / "explanations"
    real_savez = np.savez_compressed
    calls = {"count": 0}

    def crash_on_fifth(handle, **arrays) -> None:
        calls["count"] += 1
        if calls["count"] == 5:
            handle.write(b"PK\x03\x04 half a zip")  # bytes reach the disk, then the process "dies"
            raise RuntimeError("simulated crash while writing")
        real_savez(handle, **arrays)

    monkeypatch.setattr(np, "savez_compressed", crash_on_fifth)
    with pytest.raises(RuntimeError, match="simulated crash"):
        predict(tmp_path, out)
    monkeypatch.setattr(np, "savez_compressed", real_savez)
    written = sorted(out.glob("*.npz"))
    assert len(written) == 4  # the fifth never appeared under its real name
    for path in written:
        with np.load(path) as saved:  # every file present is whole
            assert saved["localization"].shape == (3, 32, 32)
    assert not (out / "sample-0-4.npz").exists()
    assert len(shard_rows(out)) == 3  # rows are appended per batch, after that batch's files are in place

    writer = predict(tmp_path, out)
    assert writer.written == NUM_SAMPLES - 3
    ids = [row["id"] for row in shard_rows(out)]
    assert len(ids) == len(set(ids)) == NUM_SAMPLES
    assert len(read_index(out)) == NUM_SAMPLES


def test_resume_repairs_a_torn_shard_line_removes_stale_temporaries_and_never_duplicates(tmp_path) -> None:
    out = tmp_path / "explanations"
    predict(tmp_path, out)
    shard = out / SHARD_FOLDER / "rank-00000.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    # crash state: the last sample's file is in place but its row never made it; a torn row and a temp file remain
    shard.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    stale = out / ".sample-0-9.npz.rank0.tmp"
    stale.write_bytes(b"half")

    writer = predict(tmp_path, out)
    assert writer.written == 1
    assert not stale.exists()
    ids = [json.loads(line)["id"] for line in shard.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == NUM_SAMPLES

    assert predict(tmp_path, out).written == 0  # a complete run is not written again
    assert len(read_index(out)) == NUM_SAMPLES


def test_a_folder_of_unrecorded_weights_is_refused_and_overwrite_always_writes_afresh(tmp_path) -> None:
    out = tmp_path / "explanations"
    predict(tmp_path, out)
    assert json.loads((out / RUN_FILE).read_text())["weights_sha256"] == read_index(out)[0]["weights_sha256"]
    (out / RUN_FILE).unlink()  # as a folder written before the writer recorded its model
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(OutputFolderError, match=r"another model \(8 \.npz file\(s\), index\.csv.*unknown model"):
        predict(tmp_path, out)
    assert sorted(p.name for p in out.iterdir()) == before
    assert predict(tmp_path, out, overwrite=True).written == NUM_SAMPLES
    assert predict(tmp_path, out, overwrite=True).written == NUM_SAMPLES  # the same weights too: nothing resumed
    assert len(read_index(out)) == NUM_SAMPLES


class _NiftiVolumes(Dataset):
    """3D samples that came "from NIfTI": each carries its voxel-to-world affine."""

    def __init__(self) -> None:
        self.affine = torch.tensor([[0.0, 0.0, 2.0, -10.0], [0.0, 1.5, 0.0, 4.0], [1.0, 0.0, 0.0, 7.0],
                                    [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> dict:
        return {"image": torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(index)),
                "label": torch.tensor(index), "id": f"volume-{index}", "affine": self.affine_of(index)}

    def affine_of(self, index: int) -> torch.Tensor:
        affine = self.affine.clone()
        affine[:3] *= index + 1
        return affine


class _NiftiData(RandomDataModule):
    def predict_dataloader(self) -> DataLoader:
        return DataLoader(_NiftiVolumes(), batch_size=2)


def test_3d_maps_are_written_as_nifti_with_the_input_affine(tmp_path) -> None:
    out = tmp_path / "explanations"
    predict(tmp_path, out, spatial_dims=3, data=_NiftiData(spatial_dims=3, num_samples=2))
    volumes = _NiftiVolumes()
    for index, row in enumerate(sorted(read_index(out), key=lambda r: r["id"])):
        assert row["nifti"] == f"volume-{index}.localization.nii.gz"
        saved = nibabel.load(out / row["nifti"])
        np.testing.assert_allclose(saved.affine, volumes.affine_of(index).numpy())
        with np.load(out / row["file"]) as arrays:
            np.testing.assert_allclose(np.moveaxis(np.asarray(saved.dataobj), -1, 0), arrays["localization"])


def test_2d_inputs_and_inputs_without_affine_get_no_nifti(tmp_path) -> None:
    out = tmp_path / "explanations"
    predict(tmp_path, out, spatial_dims=3, data=RandomDataModule(spatial_dims=3, num_samples=2))
    assert not list(out.glob("*.nii.gz"))
    assert {row["nifti"] for row in read_index(out)} == {""}


def test_feature_maps_get_the_affine_of_their_coarser_grid() -> None:
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-5.0, 0.0, 5.0]
    coarse = feature_affine(affine, (16, 16, 16), (4, 4, 4))
    centre_of_first_coarse_voxel = coarse @ np.array([0.0, 0.0, 0.0, 1.0])
    # coarse voxel 0 covers fine voxels 0..3, whose centre is fine voxel 1.5
    np.testing.assert_allclose(centre_of_first_coarse_voxel[:3], affine[:3, :3] @ [1.5, 1.5, 1.5] + affine[:3, 3])
    np.testing.assert_allclose(np.diag(coarse)[:3], [8.0, 8.0, 8.0])


def test_bad_arguments_name_the_argument(tmp_path) -> None:
    with pytest.raises(ValueError, match="nifti must be 'auto', 'always' or 'never', got 'sometimes'"):
        ExplanationWriter(tmp_path, nifti="sometimes")


def test_ddp_two_processes_write_each_sample_exactly_once(tmp_path) -> None:
    out = tmp_path / "explanations"
    torch.manual_seed(0)
    module = InterpretableModule(model="blackbox", spatial_dims=2, in_channels=1, num_classes=3,
                                 model_kwargs={"backbone_kwargs": {"channels": [4], "strides": [2]}})
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                         callbacks=[ExplanationWriter(out)])
    trainer.predict(module, datamodule=RandomDataModule(spatial_dims=2, num_samples=7, batch_size=2),
                    return_predictions=False)
    per_rank = [{row["id"] for row in read_shard(shard)} for shard in sorted((out / SHARD_FOLDER).glob("*.jsonl"))]
    assert len(per_rank) == 2 and all(per_rank)
    assert not per_rank[0] & per_rank[1]
    rows = read_index(out)
    assert sorted(row["id"] for row in rows) == sorted(f"sample-0-{i}" for i in range(7))
    assert len(list(out.glob("*.npz"))) == 7


def test_a_pushed_protopnet_lists_each_prototypes_source_from_pushs_record(tmp_path) -> None:
    """The provenance of a real prototype network comes from ``model.prototypes.sources`` (what push records)."""
    out = tmp_path / "explanations"
    torch.manual_seed(0)
    module = InterpretableModule("protopnet", spatial_dims=2, in_channels=1, num_classes=3,
                                 model_kwargs={"backbone_kwargs": {"channels": [4, 8], "strides": [2, 2]},
                                               "prototypes_per_class": 2, "prototype_channels": 8})
    layer = module.model.prototypes
    for index in range(layer.num_prototypes - 1):  # the last one was never pushed
        layer.sources[index] = PrototypeSource(
            sample_id=f"train-{index}", sample_index=index, label=index // 2, feature_index=[1, 1],
            feature_size=[4, 4], image_center=[6.0, 6.0], image_box=[[0, 12], [0, 12]], distance=0.5, epoch=6)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ExplanationWriter(out, top_k_prototypes=layer.num_prototypes)],
                         default_root_dir=tmp_path)
    trainer.predict(module, datamodule=RandomDataModule(spatial_dims=2, num_samples=3), return_predictions=False)
    for row in read_index(out):
        for rank in range(1, layer.num_prototypes + 1):
            prototype, provenance = int(row[f"prototype_{rank}"]), row[f"prototype_{rank}_provenance"]
            if prototype == layer.num_prototypes - 1:
                assert provenance == ""
            else:
                assert json.loads(provenance) == layer.sources[prototype].to_dict()
