"""`pellucid report`: the JSON has every element's section, the HTML embeds every figure, every model gets one."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from explain_toys import single_threaded  # noqa: F401 - a fixture, used through pytestmark

from pellucid.models import create_model, list_models
from pellucid.models.pretrained import BundleError
from pellucid.training import InterpretableModule
from pellucid.training.bundle import export_bundle
from pellucid.training.checkpoint import CheckpointError, load_checkpoint
from pellucid.training.cli import main
from pellucid.training.elements.callback import ELEMENTS
from pellucid.training.outputs.report import explain_and_report, load_datamodule, write_report
from pellucid.training.outputs.writer_index import read_index

TINY_PHANTOM = {"spatial_dims": 2, "seed": 0, "image_size": 32, "diameter_range_mm": [3.0, 8.0], "num_train": 4,
                "num_val": 4, "num_test": 4, "batch_size": 4, "shortcut": {"train": 1.0, "val": 1.0, "test": 1.0}}


pytestmark = pytest.mark.usefixtures("single_threaded")
def data_config(folder: Path, **changes) -> Path:
    path = folder / "data.yaml"
    init_args = {**TINY_PHANTOM, **changes}
    path.write_text(yaml.safe_dump({"data": {"class_path": "pellucid.training.data.PhantomDataModule",
                                             "init_args": init_args}}))
    return path


def task_of(name: str) -> str:
    """Classifiers make logits, segmenters do not: the data task follows from the output alone."""
    with torch.no_grad():
        output = create_model(name, 2, in_channels=1, num_classes=2).eval()(torch.zeros(1, 1, 32, 32), explain=False)
    return "multiclass" if output.logits is not None else "segmentation"


def checkpoint(name: str, folder: Path, data_path: Path) -> Path:
    """An untrained checkpoint of ``name`` built for the data (the report reads any checkpoint the same way)."""
    data = load_datamodule(data_path)
    torch.manual_seed(0)
    module = InterpretableModule(name, spatial_dims=data.spatial_dims, in_channels=data.in_channels,
                                 num_classes=data.num_classes, task=data.task, class_names=data.class_names,
                                 concepts=data.concept_specs)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    path = folder / f"{name}.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def blackbox(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("blackbox")
    data_path = data_config(folder)
    return checkpoint("blackbox", folder, data_path), data_path


def test_the_cli_report_has_every_element_side_by_side_and_the_html_embeds_every_figure(blackbox, tmp_path) -> None:
    ckpt, data_path = blackbox
    out = tmp_path / "report"
    main(["report", "--ckpt", str(ckpt), "--data", str(data_path), "--out", str(out), "--baseline", str(ckpt),
          "--sanity-samples", "2", "--deletion-samples", "2", "--data-arg", "num_test=4"])
    report = json.loads((out / "report.json").read_text())
    assert report["format"] == "pellucid-report/1"
    assert list(report["elements"]) == list(ELEMENTS)
    assert set(report["models"]) == {"model", "baseline"}
    assert {"accuracy", "balanced_accuracy", "auroc"} <= set(report["models"]["model"]["task_metrics"])
    figure_files = []
    for element, section in report["elements"].items():
        assert section["title"] and section["metrics"], element
        for metric in section["metrics"]:
            assert metric["definition"] and {"name", "higher_is_better", "model", "baseline"} <= set(metric)
        figure_files += [item["file"] for role in ("model", "baseline") for item in section["figures"][role]]
    values = {m["name"]: m for s in report["elements"].values() for m in s["metrics"]}
    for name in ("energy_inside_mask", "logit_reconstruction_exact", "randomization_spearman", "shortcut_share"):
        assert values[name]["model"] is not None and values[name]["model"] == values[name]["baseline"], name
    assert values["prototype_purity"]["model"] is None  # the black box has no prototypes: shown as not measured
    assert report["elements"]["visual_recognizability"]["notes"]["model"]
    assert all((out / f).is_file() for f in figure_files) and len(figure_files) >= 10

    page = (out / "report.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(embedded) == len(figure_files)
    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for data in embedded)
    assert all(f'id="{element}"' in page for element in ELEMENTS)
    assert not re.search(r'(src|href)="(?!data:)', page), "the page must not load anything from outside"


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_gets_a_report_on_the_2d_phantom(name: str, tmp_path) -> None:
    task = task_of(name)
    data_path = data_config(tmp_path, task=task)
    paths = write_report(checkpoint(name, tmp_path, data_path), data_path, tmp_path / "report", limit_batches=1,
                         sanity_samples=1, deletion_samples=0, examples=1)
    report = json.loads(paths.json.read_text())
    assert list(report["elements"]) == list(ELEMENTS)
    localization = {m["name"]: m["model"] for m in report["elements"]["localization"]["metrics"]}
    assert localization["energy_inside_mask"] is not None  # every model localizes
    assert report["models"]["model"]["task_metrics"]
    assert report["models"]["model"]["sanity"]["steps"]
    assert "data:image/png;base64," in paths.html.read_text()


def test_a_zoo_bundle_is_reported_by_name_and_unknown_names_are_refused(blackbox, tmp_path, monkeypatch) -> None:
    ckpt, data_path = blackbox
    monkeypatch.setenv("PELLUCID_CHECKPOINTS", str(tmp_path / "zoo"))
    module = load_checkpoint(ckpt)
    (tmp_path / "zoo").mkdir()
    export_bundle(module, tmp_path / "zoo" / "tiny_blackbox", "tiny_blackbox")
    paths = write_report("tiny_blackbox", data_path, tmp_path / "report", sanity_samples=0, deletion_samples=0,
                         examples=1)
    report = json.loads(paths.json.read_text())
    assert report["models"]["model"]["checkpoint"] == "tiny_blackbox"
    assert report["models"]["model"]["task_metrics"]
    with pytest.raises(BundleError, match=r"no bundle 'no_such_model'.*bundles: .*tiny_blackbox"):
        write_report("no_such_model", data_path, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"checkpoint file 'missing.ckpt' not found"):
        write_report("missing.ckpt", data_path, tmp_path)


def test_data_that_does_not_fit_the_checkpoint_is_named(blackbox, tmp_path) -> None:
    ckpt, _ = blackbox
    volumes = data_config(tmp_path, spatial_dims=3, image_size=16, diameter_range_mm=[4.0, 8.0], shortcut=None)
    with pytest.raises(ValueError, match=r"built for spatial_dims=2, but the data has spatial_dims=3"):
        write_report(ckpt, volumes, tmp_path / "report")


def test_the_demo_story_writes_explanations_a_report_and_an_offline_wandb_run(blackbox, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    ckpt, data_path = blackbox
    artefacts = explain_and_report(ckpt, data_path, tmp_path, sanity_samples=0, deletion_samples=0, examples=1)
    assert len(read_index(artefacts["explanations"])) == TINY_PHANTOM["num_test"]
    assert artefacts["report_html"].is_file() and artefacts["report_json"].is_file()
    assert artefacts["wandb_run"].name.startswith("offline-run-")
    assert list((artefacts["wandb_run"] / "files" / "media").rglob("*.png"))


def _leave_mark(path: str) -> None:
    """What a malicious checkpoint would run on load; here it only writes a file."""
    Path(path).write_text("code from the checkpoint ran")


class CodeOnLoad:
    """Unpickling this object calls :func:`_leave_mark`: the checkpoint needs code to load."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return _leave_mark, (self.marker,)


def test_a_checkpoint_that_needs_unpickling_code_is_refused_naming_the_file(blackbox, tmp_path, capsys) -> None:
    ckpt, data_path = blackbox
    content = torch.load(ckpt, map_location="cpu", weights_only=True)
    marker = tmp_path / "ran"
    content["callbacks"]["Extra"] = CodeOnLoad(marker)  # harmless once run: the module would still load
    tampered = tmp_path / "tampered.ckpt"
    torch.save(content, tampered)
    out = tmp_path / "report"
    refused = rf"refusing to load checkpoint '{re.escape(str(tampered))}'.*_leave_mark"
    with pytest.raises(SystemExit) as exit_info:  # a known user error: one line, no traceback, exit 1
        main(["report", "--ckpt", str(tampered), "--data", str(data_path), "--out", str(out), "--sanity-samples", "0"])
    assert exit_info.value.code == 1
    assert re.search(refused, capsys.readouterr().err)
    assert not marker.exists(), "code from the checkpoint ran"
    assert not (out / "report.json").exists()
    not_a_checkpoint = tmp_path / "notes.ckpt"
    not_a_checkpoint.write_text("hello")
    with pytest.raises(CheckpointError, match=rf"'{re.escape(str(not_a_checkpoint))}' is not a readable torch"):
        load_checkpoint(not_a_checkpoint)


def test_a_cli_checkpoint_loads_without_unpickling_with_its_weights(blackbox, tmp_path) -> None:
    """LightningCLI adds ``_instantiator`` to the hyper-parameters: it is ignored, never imported."""
    ckpt, _ = blackbox
    content = torch.load(ckpt, map_location="cpu", weights_only=True)
    content["hyper_parameters"]["_instantiator"] = "pytorch_lightning.cli.instantiate_module"
    path = tmp_path / "cli.ckpt"
    torch.save(content, path)
    module = load_checkpoint(path)
    state = module.state_dict()
    assert set(state) == set(content["state_dict"])
    assert all(torch.equal(state[k], v) for k, v in content["state_dict"].items() if isinstance(v, torch.Tensor))
    assert module.model.name == "blackbox" and module.hparams["class_names"] == ["normal", "benign", "malignant"]


def test_data_overrides_for_a_built_data_module_are_refused_not_ignored(tmp_path: Path) -> None:
    from pellucid.training.data import PhantomDataModule

    datamodule = PhantomDataModule(spatial_dims=2, seed=0, num_train=8, num_val=8, num_test=8, batch_size=4)
    with pytest.raises(ValueError, match=r"data_overrides \{'seed': 7\} cannot change a data module"):
        write_report("blackbox_phantom2d", datamodule, tmp_path / "report", data_overrides={"seed": 7})
    assert not (tmp_path / "report").exists()
