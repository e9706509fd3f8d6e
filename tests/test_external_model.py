"""A model from another package, with no edit to pellucid: registered through the entry-point group
``pellucid.models``, then trained, explained, reported and logged through the real ``pellucid`` command.

The package is written into ``tmp_path`` (a ``*.dist-info`` folder with an ``entry_points.txt``, and one module) and
reaches the subprocesses through ``PYTHONPATH``, as an installed package would through ``site-packages``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PELLUCID = Path(sys.executable).parent / "pellucid"  # the console script, as a user runs it
EXPLANATIONS = ROOT / "configs" / "predict" / "explanations.yaml"
TINY_DATA = {"spatial_dims": 2, "seed": 0, "image_size": 32, "num_train": 32, "num_val": 8, "num_test": 8,
             "num_predict": 8, "batch_size": 8, "diameter_range_mm": [3.0, 8.0]}

# The whole toy architecture: the minimal contract and nothing else.
TOY_MODULE = '''
"""A toy architecture from outside pellucid: every location votes for a class."""

from __future__ import annotations

from monai.networks.layers.factories import Conv
from torch import Tensor, nn

from pellucid.models import InterpretableModel, ModelOutput, register_model


class PatchVoter(InterpretableModel):
    """Per-location class votes; the logits are their mean and the localization their sigmoid."""

    def __init__(self, spatial_dims: int, in_channels: int = 1, num_classes: int = 2, width: int = 8) -> None:
        super().__init__(spatial_dims, in_channels, num_classes)
        conv = Conv[Conv.CONV, spatial_dims]
        self.features = nn.Sequential(conv(in_channels, width, kernel_size=3, padding=1), nn.ReLU())
        self.votes = conv(width, num_classes, kernel_size=1)

    def forward(self, image: Tensor, *, explain: bool = True) -> ModelOutput:
        votes = self.votes(self.features(image))
        return ModelOutput(logits=votes.flatten(2).mean(dim=2), localization=votes.sigmoid())

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"features": list(self.features.parameters()), "votes": list(self.votes.parameters())}


@register_model
def patch_voter(spatial_dims: int, **kwargs) -> PatchVoter:
    """Patch voter: a toy architecture from another package."""
    return PatchVoter(spatial_dims, **kwargs)
'''


def write_distribution(root: Path, name: str, entry_points: dict[str, str], modules: dict[str, str]) -> Path:
    """An installed-looking distribution under ``root``: ``<name>-0.1.dist-info`` with its entry points, and modules.

    The folder name escapes ``-`` as ``_`` (as installers do): ``importlib.metadata`` tells distributions apart by the
    part of the folder name before the first ``-``.

    Args:
        root: The folder that goes on ``sys.path``.
        name: Distribution name.
        entry_points: Entry-point name -> value (``module`` or ``module:callable``) in the group ``pellucid.models``.
        modules: Module file name (``x.py``) -> source.
    """
    dist_info = root / f"{name.replace('-', '_')}-0.1.dist-info"  # escaped, as a wheel installs it
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = "".join(f"{key} = {value}\n" for key, value in entry_points.items())
    (dist_info / "entry_points.txt").write_text(f"[pellucid.models]\n{lines}")
    for file_name, source in modules.items():
        (root / file_name).write_text(source)
    return dist_info


def pellucid(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run the ``pellucid`` command; its output, or a failure that shows it."""
    result = subprocess.run([str(PELLUCID), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"pellucid {args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout


def training_config() -> dict:
    """One epoch of the toy model on a few dozen 32-pixel phantoms, an offline W&B run that follows training."""
    return {
        "seed_everything": 0,
        "model": {"model": "patch_voter", "lr": 1.0e-2},
        "data": {"class_path": "pellucid.training.data.PhantomDataModule", "init_args": TINY_DATA},
        "trainer": {
            "max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False,
            "logger": {"class_path": "pytorch_lightning.loggers.WandbLogger",
                       "init_args": {"save_dir": ".", "offline": True, "project": "pellucid-external"}},
            "callbacks": [
                {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": "checkpoints", "filename": "toy", "save_last": False}},
                {"class_path": "pellucid.training.outputs.wandb_logging.WandbExplanationLogger",
                 "init_args": {"num_samples": 2, "log_test": False}},
            ],
        },
    }


def test_an_external_architecture_fits_predicts_reports_and_logs_through_the_cli(tmp_path) -> None:
    package = tmp_path / "site"
    write_distribution(package, "pellucid-toy-zoo", {"toy": "toy_zoo"}, {"toy_zoo.py": TOY_MODULE})
    work = tmp_path / "work"
    work.mkdir()
    config = work / "toy.yaml"
    config.write_text(yaml.safe_dump(training_config()))
    inherited = {key: value for key, value in os.environ.items()  # not a W&B service an earlier test started here
                 if not key.startswith("WANDB_")}
    env = {**inherited, "PYTHONPATH": os.pathsep.join([str(package), os.environ.get("PYTHONPATH", "")]),
           "WANDB_MODE": "offline", "WANDB_ERROR_REPORTING": "false", "WANDB_SILENT": "true",
           "OMP_NUM_THREADS": "1", "PELLUCID_CHECKPOINTS": str(tmp_path / "no_bundles")}

    zoo = pellucid(["zoo"], work, env)
    assert any(line.startswith("patch_voter ") and "another package" in line for line in zoo.splitlines()), zoo

    pellucid(["fit", "--config", str(config)], work, env)
    checkpoint = work / "checkpoints" / "toy.ckpt"
    assert checkpoint.is_file()
    (run,) = (work / "wandb").glob("offline-run-*")
    assert list(run.glob("*.wandb")), f"the offline W&B run {run} has no log file"
    assert list((run / "files" / "media" / "images").rglob("*.png")), "no explanation overlays were logged"

    pellucid(["predict", "--config", str(config), "--config", str(EXPLANATIONS), "--ckpt_path", str(checkpoint),
              "--trainer.logger=false", "--trainer.callbacks.output_dir=explained"], work, env)
    rows = (work / "explained" / "index.csv").read_text().splitlines()[1:]
    assert len(rows) == TINY_DATA["num_predict"] == len(list((work / "explained").glob("*.npz")))

    pellucid(["report", "--ckpt", str(checkpoint), "--data", str(config), "--out", "report", "--sanity-samples", "1",
              "--deletion-samples", "4", "--examples", "1"], work, env)
    report = json.loads((work / "report" / "report.json").read_text())
    assert report["models"]["model"]["name"] == "model: patch_voter"
    assert set(report["elements"]) >= {"localization", "transparency"}
    assert "data:image/png;base64," in (work / "report" / "report.html").read_text()
