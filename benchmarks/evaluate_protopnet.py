"""ProtoPNet against the black-box baseline on the 2D phantom benchmark: same backbone, same budget, one run.

Trains both with their shipped experiment configs through the CLI's own code path (``build_cli`` then
``trainer.fit``), the black box for as many epochs and on the same augmentation as ProtoPNet's config
(``same_budget.py``), tests the final weights on the test split (1,000 phantoms) and prints one JSON object:

- accuracy, balanced accuracy, AUROC (``test/`` metrics of the training module);
- pointing game and energy inside the mask of ``localization`` (the true class's map) against the lesion masks:
  class evidence for ProtoPNet, Grad-CAM for the black box, each upsampled as its config says; and the pointing
  game of both under each upsampling (``pointing_game_by_interpolation``: linear and cubic, see
  ``pellucid.models.maps``), so the two are also compared like for like;
- prototype metrics on the test split (``pellucid.training.prototype_metrics.PrototypeEvaluation``): purity against
  the phantom lesion type (k = 10 nearest images), k-NN class purity, activation precision, consistency, stability;
- push cost: one push over the training images divided by one forward pass over the same (in-memory) images;
- how well each model's latent patches on the test lesions separate the lesion types and classes
  (``latent_type_separation.py``: the ceiling of prototype purity);
- wall times and the machine.

The last weights are evaluated for both models (for ProtoPNet the pushed, interpretable ones). A prototype gallery
(k = 5 nearest training images) is written under ``--out``.

    python benchmarks/evaluate_protopnet.py [--quick] [--out outputs/evaluate_protopnet] [--json results.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from latent_type_separation import lesion_patches, separation
from push_speed import InMemory, time_forward_and_push
from same_budget import same_backbone_overrides, same_budget_overrides
from torch.utils.data import Dataset

from pellucid.models.maps import INTERPOLATION_WEIGHTS
from pellucid.training.cli import build_cli
from pellucid.training.localization import EnergyInsideMask, PointingGame, class_maps
from pellucid.training.prototype_gallery import build_gallery, save_gallery
from pellucid.training.prototype_metrics import PrototypeEvaluation
from pellucid.training.push import find_nearest_patches, push_dataloader

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"blackbox": ROOT / "configs/experiments/blackbox_phantom2d.yaml",
           "protopnet": ROOT / "configs/experiments/protopnet_phantom2d.yaml"}
QUICK = ["--data.init_args.num_train=256", "--data.init_args.num_val=64", "--data.init_args.num_test=128",
         "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]


class LocalizationScores(pl.Callback):
    """Pointing game and energy inside the mask of the true class's localization map, over the test split."""

    def __init__(self) -> None:
        self.pointing, self.energy = PointingGame(), EnergyInsideMask()

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                          batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        maps = class_maps(outputs.localization.cpu(), batch["label"].cpu())
        self.pointing.update(maps, batch["mask"].cpu())
        self.energy.update(maps, batch["mask"].cpu())


def pointing_by_interpolation(model: torch.nn.Module, loader: Any) -> dict[str, float]:
    """Pointing game of the true class's ``localization`` over ``loader`` with each upsampling the model offers."""
    kept, scores, device = model.localization_interpolation, {}, next(model.parameters()).device
    model.eval()
    try:
        for mode in INTERPOLATION_WEIGHTS:
            model.localization_interpolation, pointing = mode, PointingGame()
            with torch.no_grad():
                for batch in loader:
                    maps = model(batch["image"].to(device)).localization.cpu()
                    pointing.update(class_maps(maps, batch["label"]), batch["mask"])
            scores[mode] = round(float(pointing.compute()), 4)
    finally:
        model.localization_interpolation = kept
    return scores


def push_forward_ratio(model: torch.nn.Module, dataset: Dataset, batch_size: int, repeats: int = 2) -> dict[str, Any]:
    """Seconds of one push and of one forward pass over the same images (generated beforehand, in memory).

    Both run once on a full batch first (so kernel set-up is paid outside the timing), then alternate ``repeats``
    times; the ratio is that of the summed times.
    """
    images = InMemory([dataset[i] for i in range(len(dataset))])
    forward_s, push_s = time_forward_and_push(copy.deepcopy(model), push_dataloader(images, batch_size), repeats)
    return {"push_s": [round(t, 3) for t in push_s], "forward_s": [round(t, 3) for t in forward_s],
            "push_over_forward": round(sum(push_s) / sum(forward_s), 3), "images": len(images)}


def evaluate(name: str, out: Path, quick: bool) -> tuple[dict[str, Any], Any]:
    """Fit ``name`` with its shipped config, test it, and return its numbers and the CLI (for the model)."""
    budget = [] if name != "blackbox" else [  # same epochs, same data, same backbone
        *same_budget_overrides(CONFIGS["protopnet"]), *same_backbone_overrides(CONFIGS["protopnet"])]
    args = ["--config", str(CONFIGS[name]), "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={out / name}", *budget, *(QUICK if quick else [])]
    cli = build_cli(args, run=False)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    fit_s = time.perf_counter() - start
    scores = LocalizationScores()
    cli.trainer.callbacks.append(scores)
    prototype_metrics = PrototypeEvaluation(k=10, stages=["test"])
    if name != "blackbox":
        cli.trainer.callbacks.append(prototype_metrics)
    start = time.perf_counter()
    tested = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    result = {"fit_s": round(fit_s, 1), "test_s": round(time.perf_counter() - start, 1),
              **{key.removeprefix("test/"): round(float(v), 4) for key, v in tested.items()
                 if key in ("test/accuracy", "test/balanced_accuracy", "test/auroc") or "prototype_" in key},
              "pointing_game": round(float(scores.pointing.compute()), 4),
              "energy_inside_mask": round(float(scores.energy.compute()), 4),
              "localization_interpolation": cli.model.model.localization_interpolation,
              "pointing_game_by_interpolation": pointing_by_interpolation(cli.model.model,
                                                                          cli.datamodule.test_dataloader())}
    cli.model.model.eval()
    result["latent_type_separation"] = separation(*lesion_patches(cli.model.model, cli.datamodule), k=10)
    return result, cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny splits, 2 batches per epoch")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs/evaluate_protopnet", help="logs and gallery")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    arguments = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    start = time.perf_counter()
    results: dict[str, Any] = {}
    for name in ("blackbox", "protopnet"):
        results[name], cli = evaluate(name, arguments.out, arguments.quick)
    model, datamodule = cli.model.model, cli.datamodule
    train = datamodule.train_dataloader().dataset
    push_reports = [c for c in cli.trainer.callbacks if hasattr(c, "reports")][0].reports
    results["protopnet"]["push"] = {**push_forward_ratio(model, train, datamodule.batch_size),
                                    "push_s_during_training": [round(r.seconds, 2) for r in push_reports]}
    model.eval()
    nearest = find_nearest_patches(model, push_dataloader(train, datamodule.batch_size), k=5)
    gallery = save_gallery(build_gallery(model, train, nearest, datamodule.class_names), arguments.out / "gallery")
    results["protopnet"]["gallery"] = str(gallery[-1])
    gap = results["blackbox"]["accuracy"] - results["protopnet"]["accuracy"]
    results["accuracy_gap_points"] = round(100 * gap, 2)
    results["wall_s"] = round(time.perf_counter() - start, 1)
    results["machine"] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "load_average_at_end": [round(x, 2) for x in os.getloadavg()], "torch": torch.__version__,
                          "quick": arguments.quick}
    text = json.dumps(results, indent=2)
    print(text)
    if arguments.json is not None:
        arguments.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
