"""A folder of NIfTI volumes and a CSV: train, fine-tune from a shipped checkpoint, predict, report (one command each).

Runs the README walk-through's commands through the ``pellucid`` entry point on the 3D example folder that
``pellucid.training.data.example_data`` builds from real volumes installed packages ship (tiny budgets).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from pellucid.training.checkpoint import load_checkpoint
from pellucid.training.cli import build_cli, main
from pellucid.training.data.example_data import write_example_3d
from pellucid.training.prototypes.push import source_gaps

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--trainer.max_epochs=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--trainer.logger=false"]


def test_a_nifti_folder_trains_fine_tunes_predicts_and_reports(tmp_path: Path, monkeypatch, capsys) -> None:
    manifest = write_example_3d(tmp_path / "own3d")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PELLUCID_CHECKPOINTS", raising=False)  # the shipped checkpoints/
    monkeypatch.setattr(sys, "argv", ["pellucid"])
    data = ["--config", str(ROOT / "docs/examples/own_data_3d.yaml"), f"--data.init_args.manifest={manifest}"]

    main(["fit", *data, "--trainer.default_root_dir=scratch", *QUICK])  # train from scratch
    assert list((tmp_path / "scratch").rglob("*.ckpt"))

    protopnet = ["--config", "zoo:protopnet"]  # the README's form: configs/model/protopnet.yaml
    main(["fit", *data, *protopnet, "--init_from", "protopnet_phantom3d", "--trainer.default_root_dir=tuned", *QUICK])
    printed = capsys.readouterr().out
    assert "initialising protopnet from bundle protopnet_phantom3d" in printed
    assert "re-initialised last_layer.weight" in printed  # the example's classes are not the phantom's
    (checkpoint,) = list((tmp_path / "tuned").rglob("last.ckpt"))  # fit keeps the last (pushed) weights
    assert_pushed_onto(checkpoint, [*data, *protopnet])

    main(["predict", *data, *protopnet, "--config", "zoo:explanations",
          "--trainer.callbacks.output_dir=explanations", f"--ckpt_path={checkpoint}", *QUICK])
    with (tmp_path / "explanations" / "index.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all((tmp_path / "explanations" / f"{row['id']}.npz").is_file() for row in rows)
    assert list((tmp_path / "explanations").glob("*.nii.gz"))  # the input was NIfTI: maps also as NIfTI

    main(["report", "--ckpt", str(checkpoint), "--data", str(ROOT / "docs/examples/own_data_3d.yaml"),
          "--data-arg", f"manifest={manifest}", "--out", "report", "--sanity-samples", "0", "--deletion-samples", "2",
          "--examples", "1"])
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["models"]["model"]["name"].endswith("protopnet")
    assert (tmp_path / "report" / "report.html").is_file()


def assert_pushed_onto(checkpoint: Path, config: list[str]) -> None:
    """Every prototype of the fine-tuned model has a source in this data's training split and equals its latent patch.

    The family's recipe ran (no callback in the configs): a one-epoch fit is one push + last-layer phase.
    """
    model = load_checkpoint(checkpoint).model.eval()
    cli = build_cli([*config, *QUICK], run=False)
    cli.datamodule.setup("fit")
    dataset = cli.datamodule.push_dataset() if hasattr(cli.datamodule, "push_dataset") else \
        cli.datamodule.dataset("train")
    ids = {dataset[i]["id"] for i in range(len(dataset))}
    sources = model.prototypes.sources
    assert all(source is not None and source.sample_id in ids for source in sources), \
        [None if s is None else s.sample_id for s in sources]
    assert float(source_gaps(model, dataset).max()) <= 1e-5  # each prototype is its source patch's latent
