"""ProtoPNet against the black-box baseline on the 2D phantom benchmark: same backbone, same budget, one run.

Trains both with their shipped experiment configs through the CLI's own code path
(``pellucid.training.evaluate.fit_config``), the black box for as many epochs, on the same augmentation and with the
same backbone as ProtoPNet's config (``same_budget_overrides``, ``same_backbone_overrides``), tests the final
weights on the test split (1,000 phantoms) and prints one JSON object:

- accuracy, balanced accuracy, AUROC (``test/`` metrics of the training module);
- pointing game and energy inside the mask of ``localization`` (the true class's map) against the lesion masks:
  class evidence for ProtoPNet, Grad-CAM for the black box, each upsampled as its config says; and the pointing
  game of both under each upsampling (``pointing_game_by_interpolation``: linear and cubic, see
  ``pellucid.models.maps``), so the two are also compared like for like;
- prototype metrics on the test split (``evaluate_measures.prototype_test_callbacks``): purity against
  the phantom lesion type (k = 10 nearest images), k-NN class purity, activation precision, consistency, stability;
- push cost: one push over the training images divided by one forward pass over the same (in-memory) images;
- how well each model's latent patches on the test lesions separate the lesion types and classes
  (``evaluate_measures.latent_separation``: the ceiling of prototype purity);
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
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from pellucid.training.evaluate import (
    FitResult,
    fit_config,
    machine,
    same_backbone_overrides,
    same_budget_overrides,
    test_metrics,
)
from pellucid.training.evaluate_measures import (
    InMemory,
    LocalizationScores,
    latent_separation,
    lesion_patches,
    pointing_by_interpolation,
    prototype_test_callbacks,
    push_loader,
    time_forward_and_push,
    write_prototype_gallery,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"blackbox": ROOT / "configs/experiments/blackbox_phantom2d.yaml",
           "protopnet": ROOT / "configs/experiments/protopnet_phantom2d.yaml"}
QUICK = ["--data.init_args.num_train=256", "--data.init_args.num_val=64", "--data.init_args.num_test=128",
         "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]


def push_forward_ratio(model: torch.nn.Module, dataset: Dataset, batch_size: int, repeats: int = 2) -> dict[str, Any]:
    """Seconds of one push and of one forward pass over the same images (generated beforehand, in memory).

    Both run once on a full batch first (so kernel set-up is paid outside the timing), then alternate ``repeats``
    times; the ratio is that of the summed times.
    """
    images = InMemory([dataset[i] for i in range(len(dataset))])
    forward_s, push_s = time_forward_and_push(copy.deepcopy(model), push_loader(images, batch_size), repeats)
    return {"push_s": [round(t, 3) for t in push_s], "forward_s": [round(t, 3) for t in forward_s],
            "push_over_forward": round(sum(push_s) / sum(forward_s), 3), "images": len(images)}


def evaluate(name: str, out: Path, quick: bool) -> tuple[dict[str, Any], FitResult]:
    """Fit ``name`` with its shipped config, test its last weights, and return its numbers and the fit (the model)."""
    budget = [] if name != "blackbox" else [  # same epochs, same data, same backbone
        *same_budget_overrides(CONFIGS["protopnet"]), *same_backbone_overrides(CONFIGS["protopnet"])]
    fit = fit_config(CONFIGS[name], [*budget, *(QUICK if quick else [])], root=out / name, select="last")
    scores = LocalizationScores()
    callbacks = [scores, *(prototype_test_callbacks(k=10) if name != "blackbox" else [])]
    tested = test_metrics(fit, callbacks=callbacks, from_checkpoint=False)
    model = fit.module.model
    result = {"fit_s": round(fit.fit_seconds, 1), "test_s": round(fit.test_seconds, 1),
              **{key.removeprefix("test/"): round(float(v), 4) for key, v in tested.items()
                 if key in ("test/accuracy", "test/balanced_accuracy", "test/auroc") or "prototype_" in key},
              "pointing_game": round(float(scores.pointing.compute()), 4),
              "energy_inside_mask": round(float(scores.energy.compute()), 4),
              "localization_interpolation": model.localization_interpolation,
              "pointing_game_by_interpolation": pointing_by_interpolation(model, fit.datamodule.test_dataloader())}
    model.eval()
    result["latent_type_separation"] = latent_separation(*lesion_patches(model, fit.datamodule), k=10)
    return result, fit


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
        results[name], fit = evaluate(name, arguments.out, arguments.quick)
    model, datamodule = fit.module.model, fit.datamodule
    train = datamodule.train_dataloader().dataset
    push_reports = [c for c in fit.trainer.callbacks if hasattr(c, "reports")][0].reports
    results["protopnet"]["push"] = {**push_forward_ratio(model, train, datamodule.batch_size),
                                    "push_s_during_training": [round(r.seconds, 2) for r in push_reports]}
    gallery = write_prototype_gallery(model, train, datamodule.batch_size, datamodule.class_names,
                                      arguments.out / "gallery", k=5)
    results["protopnet"]["gallery"] = str(gallery[-1])
    gap = results["blackbox"]["accuracy"] - results["protopnet"]["accuracy"]
    results["accuracy_gap_points"] = round(100 * gap, 2)
    results["wall_s"] = round(time.perf_counter() - start, 1)
    results["machine"] = {**machine(), "quick": arguments.quick}
    text = json.dumps(results, indent=2)
    print(text)
    if arguments.json is not None:
        arguments.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
