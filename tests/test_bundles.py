"""Checkpoint bundles: export, verified loading, refusal of tampering, fine-tuning initialisation."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import save_file
from synthetic import RandomDataModule, make_batch

from pellucid.models.pretrained import BundleError, list_bundles, load_pretrained
from pellucid.training import InterpretableModule
from pellucid.training.bundle import export_bundle, initialise_from
from pellucid.training.cli import main


def trained_module(tmp_path, num_classes: int = 3) -> InterpretableModule:
    module = InterpretableModule("blackbox", spatial_dims=2, in_channels=1, num_classes=num_classes,
                                 class_names=[f"c{i}" for i in range(num_classes)])
    pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, enable_checkpointing=False,
               enable_model_summary=False, default_root_dir=tmp_path).fit(
        module, datamodule=RandomDataModule(num_classes=num_classes))
    return module.eval()


@pytest.fixture()
def bundle(tmp_path, monkeypatch):
    monkeypatch.setenv("PELLUCID_CHECKPOINTS", str(tmp_path / "zoo"))
    (tmp_path / "zoo").mkdir()
    module = trained_module(tmp_path)
    path = export_bundle(module, tmp_path / "zoo" / "toy", "toy", metrics={"test/accuracy": 0.5},
                         data={"dataset": "random"}, input_spec={"intensity": "none"})
    return module, path


def test_export_then_load_gives_the_same_predictions(bundle) -> None:
    module, path = bundle
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "SHA256SUMS", "metadata.json", "weights.safetensors"]
    model, metadata = load_pretrained("toy")
    image = make_batch(2)["image"]
    torch.testing.assert_close(model(image, explain=False).logits, module(image, explain=False).logits)
    assert metadata["classes"] == ["c0", "c1", "c2"] and metadata["model"]["name"] == "blackbox"
    assert [b for b in list_bundles() if b.name == "toy"] == [path]  # the user's folder adds to the shipped bundles
    assert "test/accuracy: 0.5000" in (path / "README.md").read_text()


def test_export_creates_missing_parent_folders_and_leaves_no_staging(tmp_path) -> None:
    out = tmp_path / "not" / "yet" / "there" / "toy"
    export_bundle(trained_module(tmp_path), out, "toy")
    assert (out / "weights.safetensors").is_file()
    assert [p.name for p in out.parent.iterdir()] == ["toy"]  # the staging folder was renamed, not left behind


def test_a_failed_replacement_keeps_the_previous_bundle(bundle, monkeypatch) -> None:
    module, path = bundle
    before = (path / "metadata.json").read_text()
    real_replace = os.replace

    def replace_failing_on_the_new_bundle(source, target):
        if Path(target) == path and Path(source).name.startswith(".toy-") and "-old-" not in str(source):
            raise OSError("disk full")
        return real_replace(source, target)

    monkeypatch.setattr("pellucid.training.bundle.os.replace", replace_failing_on_the_new_bundle)
    with pytest.raises(OSError, match="disk full"):
        export_bundle(module, path, "toy", metrics={"test/accuracy": 0.9})
    assert (path / "metadata.json").read_text() == before  # the old bundle is back, whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["toy"]  # no staging or moved-aside folder left
    load_pretrained("toy")


def test_tampered_weights_and_wrong_architecture_are_refused(bundle) -> None:
    _, path = bundle
    with pytest.raises(BundleError, match="holds a 'blackbox' model, expected 'protopnet'"):
        load_pretrained(path, expected_model="protopnet")
    data = bytearray((path / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError,
                       match=r"weights.safetensors has sha256 [0-9a-f]{64}, SHA256SUMS expects [0-9a-f]{64}"):
        load_pretrained(path)
    with pytest.raises(BundleError, match=r"no bundle 'nothing'.*bundles: .*toy"):
        load_pretrained("nothing")


def test_initialise_from_reinitialises_mismatched_heads(bundle, tmp_path) -> None:
    source, path = bundle
    target = InterpretableModule("blackbox", spatial_dims=2, in_channels=1, num_classes=5)
    fresh_head = target.model.classifier.weight.detach().clone()
    report = initialise_from(target, path)
    assert any("re-initialised classifier.weight: source shape (3, 64), this model (5, 64)" in r for r in report)
    torch.testing.assert_close(target.model.backbone.stages[0].conv.unit0.conv.weight,
                               source.model.backbone.stages[0].conv.unit0.conv.weight)
    assert torch.equal(target.model.classifier.weight, fresh_head)
    weights = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(weights))
    report = initialise_from(target, weights)
    total = sum(isinstance(v, torch.Tensor) for v in target.model.state_dict().values())
    assert report[1] == f"  copied {total - 2} of {total} tensors: backbone ({total - 2})", report


def test_fit_with_init_from_through_the_cli(bundle, tmp_path, monkeypatch, capsys) -> None:
    _, path = bundle
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["pellucid"])
    configs = Path(__file__).resolve().parents[1] / "configs"
    main(["fit", "--config", str(configs / "data" / "phantom2d.yaml"),
          "--config", str(configs / "model" / "blackbox.yaml"), "--init_from", "toy",
          "--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false"])
    out = capsys.readouterr().out
    assert "initialising blackbox from bundle toy" in out and "copied" in out


def test_export_from_a_lightning_checkpoint_via_the_cli(tmp_path, monkeypatch) -> None:
    module = trained_module(tmp_path)
    trainer = pl.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path)
    trainer.strategy.connect(module)
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"test/accuracy": 0.25}))
    main(["export", "--ckpt", str(ckpt), "--name", "fromckpt", "--out", str(tmp_path / "b"), "--metrics", str(metrics)])
    model, metadata = load_pretrained(tmp_path / "b")
    assert metadata["metrics"] == {"test/accuracy": 0.25}
    report = initialise_from(InterpretableModule("blackbox", spatial_dims=2, in_channels=1, num_classes=3), ckpt)
    assert report[0].startswith("initialising blackbox from Lightning checkpoint")
