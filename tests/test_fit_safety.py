"""Issue 21: nothing silently wrong, nothing lost — resume, fine-tuning initialisation, bundle hashes, CLI errors.

Each test is named after the case of the issue it covers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning_fabric.utilities.data import _set_sampler_epoch
from synthetic import RandomDataModule
from test_module import trainer

from pellucid.models.pretrained import BundleError, load_pretrained
from pellucid.training import InterpretableModule
from pellucid.training.bundle import InitialisationError, export_bundle, initialise_from, write_checksums
from pellucid.training.checkpoint import read_checkpoint
from pellucid.training.cli import main
from pellucid.training.data import PhantomDataModule

ROOT = Path(__file__).resolve().parents[1]
DATA_2D, BLACKBOX = ROOT / "configs" / "data" / "phantom2d.yaml", ROOT / "configs" / "model" / "blackbox.yaml"
# a deterministic tiny fit: 10 augmented steps an epoch, no dropout, CPU
TINY_FIT = ["fit", "--config", str(DATA_2D), "--config", str(BLACKBOX), "--data.init_args.num_train=160",
            "--data.init_args.num_val=16", "--data.init_args.num_test=16", "--data.init_args.batch_size=16",
            "--data.init_args.augment=true", "--trainer.accelerator=cpu", "--trainer.deterministic=true",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["pellucid"])


def _epoch_ids(loader, epoch: int) -> list[str]:
    _set_sampler_epoch(loader, epoch)  # what Lightning's fit loop does before every training epoch
    return [sample_id for batch in loader for sample_id in batch["id"]]


def test_case5_each_epoch_order_is_a_function_of_seed_and_epoch() -> None:
    data = PhantomDataModule(num_train=24, num_val=0, num_test=0, batch_size=8, seed=3)
    first_run = data.train_dataloader()
    epochs = [_epoch_ids(first_run, epoch) for epoch in range(2)]
    resumed = PhantomDataModule(num_train=24, num_val=0, num_test=0, batch_size=8, seed=3).train_dataloader()
    assert epochs[0] != epochs[1]  # still shuffled anew every epoch
    assert _epoch_ids(resumed, 1) == epochs[1]  # a fresh loader (a resumed fit) replays epoch 1, not epoch 0
    assert sorted(epochs[1]) == sorted(epochs[0])


def _final_weights(root: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(root / "checkpoints" / "last.ckpt")["state_dict"]


def test_case5_kill_9_then_resume_equals_the_uninterrupted_run(tmp_path, capsys) -> None:
    epochs = ["--trainer.max_epochs=4"]
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "pellucid.training.cli", *TINY_FIT, *epochs,
               f"--trainer.default_root_dir={killed}"]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_ERROR_REPORTING": "false"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.3))  # a random step of a later epoch
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert last.exists(), stderr.decode()[-2000:]
    stopped_at = read_checkpoint(last)["epoch"]
    assert stopped_at < 3, "the fit ended before it was killed: nothing was resumed"

    main([*TINY_FIT, *epochs, f"--trainer.default_root_dir={killed}", "--ckpt_path", str(last)])
    assert f"last checkpoint: {last}" in capsys.readouterr().out  # fit says where its checkpoint is
    uninterrupted = tmp_path / "uninterrupted"
    main([*TINY_FIT, *epochs, f"--trainer.default_root_dir={uninterrupted}"])
    resumed, reference = _final_weights(killed), _final_weights(uninterrupted)
    assert resumed.keys() == reference.keys()
    differing = [key for key in reference if not torch.equal(resumed[key], reference[key])]
    assert not differing, f"killed after epoch {stopped_at}: {len(differing)} tensors differ, e.g. {differing[:3]}"


def _module(spatial_dims: int = 2, num_classes: int = 3, model: str = "blackbox", **kwargs) -> InterpretableModule:
    return InterpretableModule(model, spatial_dims=spatial_dims, in_channels=1, num_classes=num_classes,
                               class_names=[f"c{i}" for i in range(num_classes)], **kwargs)


@pytest.fixture()
def toy_bundle(tmp_path) -> Path:
    module = _module()
    trainer(tmp_path, max_steps=1).fit(module, datamodule=RandomDataModule())
    return export_bundle(module.eval(), tmp_path / "toy", "toy", metrics={"test/accuracy": 0.5})


def test_case2_init_from_says_exactly_what_it_copied_and_what_it_reinitialised(toy_bundle) -> None:
    same = initialise_from(_module(), toy_bundle)
    total = sum(isinstance(v, torch.Tensor) for v in _module().model.state_dict().values())
    assert same[1].startswith(f"  copied {total} of {total} tensors: backbone (")
    assert not any("re-initialised " in line and "nothing" not in line for line in same), same
    assert "  re-initialised nothing: every tensor of this model comes from the source" in same
    other = initialise_from(_module(num_classes=5), toy_bundle)
    assert other[1].startswith(f"  copied {total - 2} of {total} tensors: backbone (")
    assert {line.split(":")[0] for line in other if "re-initialised" in line} == {
        "  re-initialised classifier.weight", "  re-initialised classifier.bias"}


def test_case6_init_from_another_spatial_dims_or_task_is_refused_unless_partial(toy_bundle, tmp_path) -> None:
    three_d = _module(spatial_dims=3)
    before = {k: v.clone() for k, v in three_d.model.state_dict().items()}
    with pytest.raises(InitialisationError, match=r"its spatial_dims 2 \(this model: 3\).*--init_partial true"):
        initialise_from(three_d, toy_bundle)
    assert all(torch.equal(before[k], v) for k, v in three_d.model.state_dict().items())  # nothing was copied
    report = initialise_from(three_d, toy_bundle, partial=True)
    assert any(line.startswith("  partial copy (--init_partial) from a source of another spatial_dims") for line in
               report), report
    segmenter = _module(model="attention_unet", num_classes=2, task="segmentation")
    with pytest.raises(InitialisationError, match=r"its task 'multiclass' \(this model: 'segmentation'\).*only 0 of"):
        initialise_from(segmenter, toy_bundle)


def test_case6_init_from_refusal_through_the_cli_is_one_line(toy_bundle, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs" / "data" / "phantom3d.yaml"), "--config", str(BLACKBOX),
              "--init_from", str(toy_bundle), "--trainer.fast_dev_run=true"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pellucid: error: --init_from") and "spatial_dims 2 (this model: 3)" in err[-1]
    assert not any("Traceback" in line for line in err)


@pytest.mark.parametrize("edit", ["classes", "extra file", "no checksums", "config"])
def test_case7_an_edited_bundle_file_is_refused(toy_bundle, edit: str) -> None:
    load_pretrained(toy_bundle)
    if edit == "classes":
        metadata = json.loads((toy_bundle / "metadata.json").read_text())
        metadata["classes"] = ["c2", "c1", "c0"]
        (toy_bundle / "metadata.json").write_text(json.dumps(metadata))
        expected = r"metadata.json has sha256 [0-9a-f]{64}, SHA256SUMS expects"
    elif edit == "extra file":
        (toy_bundle / "notes.txt").write_text("hello")
        expected = r"\['notes.txt'\] are not in SHA256SUMS"
    elif edit == "no checksums":
        (toy_bundle / "SHA256SUMS").unlink()
        expected = r"missing SHA256SUMS .*`python -m pellucid.training.bundle "
    else:
        (toy_bundle / "README.md").write_text("# another card\n")
        expected = r"README.md has sha256"
    with pytest.raises(BundleError, match=expected):
        load_pretrained(toy_bundle)
    with pytest.raises(BundleError, match=expected):
        initialise_from(_module(), toy_bundle)


def test_case7_write_checksums_vouches_for_an_old_bundle_but_not_for_changed_weights(toy_bundle) -> None:
    (toy_bundle / "SHA256SUMS").unlink()
    write_checksums(toy_bundle)
    load_pretrained(toy_bundle)
    data = bytearray((toy_bundle / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (toy_bundle / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="metadata.json expects"):
        write_checksums(toy_bundle)


def test_case10_a_refused_pickled_ckpt_path_names_the_file_in_one_line(tmp_path, capsys) -> None:
    bad = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": argparse.Namespace(lr=1.0)}, bad)
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY_FIT, "--trainer.max_epochs=1", "--ckpt_path", str(bad)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("pellucid: error: refusing to load checkpoint") and str(bad) in last
    assert "weights_only=False" not in err and "Traceback" not in err


def test_case11_debug_shows_the_traceback(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PELLUCID_DEBUG", "1")
    with pytest.raises(BundleError, match="no bundle 'nothing'"):
        main([*TINY_FIT, "--trainer.fast_dev_run=true", "--init_from", "nothing"])


def test_case11_the_command_prints_no_third_party_noise(tmp_path) -> None:
    result = subprocess.run([sys.executable, "-m", "pellucid.training.cli", *TINY_FIT, "--trainer.fast_dev_run=true"],
                            capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for noise in ("LeafSpec", "litlogger", "litmodels", "nvImageCodec", "LightningCLI's args parameter"):
        assert noise not in result.stderr + result.stdout, noise


def test_case11_a_one_class_split_reports_auroc_as_undefined_not_zero() -> None:
    from torchmetrics.classification import MulticlassAUROC

    from pellucid.training.metrics import task_metrics

    probabilities = torch.rand(12, 3, generator=torch.Generator().manual_seed(0)).softmax(dim=1)
    one_class = task_metrics("multiclass", 3, prefix="test/")
    one_class.update(probabilities, torch.zeros(12, dtype=torch.long))
    assert math.isnan(float(one_class.compute()["test/auroc"]))  # was 0.000
    two_classes = torch.tensor([0, 1] * 6)
    partial = task_metrics("multiclass", 3, prefix="test/")
    partial.update(probabilities, two_classes)
    reference = MulticlassAUROC(3, average="none")
    reference.update(probabilities, two_classes)
    assert float(partial.compute()["test/auroc"]) == pytest.approx(float(reference.compute()[:2].mean()))
    labels = (torch.rand(12, 3, generator=torch.Generator().manual_seed(1)) > 0.5).long()
    labels[:, 2] = 1  # a label without negatives is undefined and left out
    multilabel = task_metrics("multilabel", 3, prefix="test/")
    multilabel.update(probabilities, labels)
    assert math.isfinite(float(multilabel.compute()["test/auroc"]))


def test_case10_w_and_b_online_without_a_server_falls_back_offline_within_30_s(tmp_path) -> None:
    """Online mode against a closed local port (no network needed): an offline run, well within the 30 s promised."""
    script = ("import sys, time\n"
              "from pellucid.training.outputs.wandb_logging import init_run\n"
              "start = time.perf_counter()\n"
              "run = init_run(sys.argv[1], mode='online', init_timeout=15.0)\n"
              "print('offline' if run.settings._offline else 'online', time.perf_counter() - start)\n"
              "run.finish()\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env.update(WANDB_BASE_URL="http://127.0.0.1:9", WANDB_API_KEY="x" * 40, WANDB_ERROR_REPORTING="false")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    mode, seconds = done.stdout.split()[-2:]
    assert mode == "offline" and float(seconds) < 30.0, done.stdout
    assert list((tmp_path / "wandb").glob("offline-run-*"))
