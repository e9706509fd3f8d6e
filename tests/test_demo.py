"""`pellucid demo` on tiny data: train ProtoPNet, explain, report, offline W&B run; every printed artefact exists."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from explain_toys import single_threaded  # noqa: F401 - a fixture, used through pytestmark

from pellucid.training.cli import main
from pellucid.training.demo import ARTEFACT_LABELS, DEMO_CONFIG, run_demo
from pellucid.training.outputs.writer_index import read_index
from pellucid.training.shipped_configs import resolve_config

ROOT = Path(__file__).resolve().parents[1]
TINY = {"num_train": 8, "num_val": 4, "num_test": 4, "num_predict": 4, "batch_size": 4, "image_size": 32,
        "diameter_range_mm": [3.0, 8.0]}

pytestmark = pytest.mark.usefixtures("single_threaded")


def tiny_overrides(folder: Path) -> list[str]:
    """One epoch on a handful of 32-pixel phantoms; every file under ``folder``."""
    data = [f"--data.init_args.{key}={json.dumps(value)}" for key, value in TINY.items()]
    return ["--trainer.max_epochs=1", f"--trainer.default_root_dir={folder / 'outputs'}",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *data,
            "--wandb_dir", str(folder)]


@pytest.fixture(autouse=True)
def _from_the_repository_root(monkeypatch) -> None:
    """As `make demo` runs: from the repository root (the default config is a relative path), offline W&B."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["pellucid"])
    monkeypatch.setenv("WANDB_MODE", "offline")


def test_the_default_demo_trains_the_shipped_protopnet_experiment() -> None:
    assert resolve_config(DEMO_CONFIG) == ROOT / "configs/experiments/protopnet_phantom2d.yaml"
    config = yaml.safe_load(resolve_config(DEMO_CONFIG).read_text())
    assert config["model"]["model"] == "protopnet"
    assert config["data"]["init_args"]["spatial_dims"] == 2


def test_the_demo_prints_every_artefact_and_each_exists(tmp_path, capsys) -> None:
    result = run_demo(tiny_overrides(tmp_path))
    printed = capsys.readouterr().out
    artefacts = result.artefacts
    assert set(artefacts) == set(ARTEFACT_LABELS)
    for key, path in artefacts.items():
        assert path.exists(), key
        assert f"{ARTEFACT_LABELS[key]:<20} {path}" in printed, key
        assert tmp_path in path.parents, f"{key} written outside the demo's folders: {path}"

    assert artefacts["checkpoint"].suffix == ".ckpt"
    rows = read_index(artefacts["explanations"])
    assert len(rows) == TINY["num_predict"] and artefacts["index"].is_file()
    assert sorted(p.name for p in artefacts["explanations"].glob("*.npz")) == sorted(row["file"] for row in rows)
    assert all(row["prototype_1"] != "" for row in rows)  # ProtoPNet: top prototypes listed per prediction

    report = json.loads(artefacts["report_json"].read_text())
    assert report["models"]["model"]["name"] == "model: protopnet"
    assert "data:image/png;base64," in artefacts["report_html"].read_text()

    run = artefacts["wandb_run"]
    assert run.parent == tmp_path / "wandb" and run.name.startswith("offline-run-")
    assert list(run.glob("*.wandb")), "the offline run has no log file"
    media = run / "files" / "media"
    assert list((media / "images" / "val").rglob("*.png")), "no explanation overlays logged during training"
    assert list((media / "images" / "model").rglob("*.png")), "no report figures logged"
    assert list((media / "html").glob("report*.html")), "the report page was not logged"

    assert "test metrics" in printed and "accuracy" in printed
    assert set(result.task_metrics) >= {"accuracy", "balanced_accuracy"}
    assert "localization / energy_inside_mask" in printed


def test_demo_help_names_its_own_options_and_the_default_config(capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["demo", "--help"])
    assert stopped.value.code == 0
    text = capsys.readouterr().out
    assert all(option in text for option in ("--out", "--wandb_dir", "--baseline", DEMO_CONFIG))


def test_the_demo_runs_any_experiment_config_given_with_its_overrides(tmp_path, capsys) -> None:
    config = ROOT / "configs" / "experiments" / "blackbox_phantom2d.yaml"  # monitors val/balanced_accuracy
    main(["demo", "--config", str(config), *tiny_overrides(tmp_path), "--out", str(tmp_path / "story")])
    printed = capsys.readouterr().out
    assert "pellucid demo finished: blackbox" in printed
    assert "best-epoch=00.ckpt" in printed
    report = json.loads((tmp_path / "story" / "report" / "report.json").read_text())
    assert report["models"]["model"]["name"] == "model: blackbox"
    assert len(read_index(tmp_path / "story" / "explanations")) == TINY["num_predict"]
