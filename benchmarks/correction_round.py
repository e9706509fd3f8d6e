"""One correction round on the shortcut phantom: does forbidding the shortcut prototypes fix the model?

The data: the 2D phantom with a corner marker that is present on exactly the malignant scans in training and
validation (``shortcut: {train: 1.0, val: 1.0}``) and independent of the label at test (``test: 0.5``), so a model that
reads the marker loses accuracy at test. Per training seed:

1. **before**: ProtoPNet (``configs/model/protopnet.yaml``: the family's recipe, no mask or concept guidance, which
   would themselves steer it off the marker) trained on it.
2. **review**: a simulated reviewer looks at each prototype's most activated training patches (its gallery) and
   marks each one that lies on the marker as a *forbidden* patch (``where: activation``: a prototype pushed onto a
   lesion can still fire on the marker, and a source patch is one of its most activated patches). The corrections
   file is written with :mod:`pellucid.models.prototype_corrections`, the format ``pellucid review`` writes.
3. **corrected**: ``pellucid fit --init_from <before> --corrections <file>`` for ``--finetune-epochs`` with the recipe.
4. **control**: the same fine-tune without corrections (so the gain is the corrections', not the extra epochs').

Measured on the test split (marker independent of the label): accuracy, and the evidence on the marker as the
report card measures it (``marker_enrichment``: mean evidence of the predicted class on the marker over its mean
over the image, 1 = uniform; over the test scans that carry the marker), the share of the predicted class's
evidence mass that lies on the marker, and how often the model calls a marked and an unmarked test scan malignant
(what the decision, not the explanation, makes of the marker). Prints one JSON line per seed and stage and a
summary (mean ± sd).

    python benchmarks/correction_round.py --seeds 0 1 --out /tmp/correction_round
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from pellucid.models import Corrections, write_corrections
from pellucid.training.data import PhantomDataModule
from pellucid.training.evaluate import load_checkpoint, machine, marker_enrichment
from pellucid.training.evaluate import run_pellucid as pellucid

ROOT = Path(__file__).resolve().parents[1]
PROTOTYPE_FAMILIES = ("protopnet", "xprotonet", "pipnet")


def configs(family: str) -> list[Path]:
    """The 2D phantom's data config and the family's recipe config (``configs/model/<family>.yaml``)."""
    return [ROOT / "configs/data/phantom2d.yaml", ROOT / f"configs/model/{family}.yaml"]
SHORTCUT = '{"train": 1.0, "val": 1.0, "test": 0.5}'
MALIGNANT = 2  # the class the marker tracks in training (the phantom's label order: normal, benign, malignant)


def data_overrides(num_train: int) -> list[str]:
    return [f"--data.init_args.shortcut={SHORTCUT}", f"--data.init_args.num_train={num_train}",
            "--data.init_args.num_val=300", "--data.init_args.num_test=1000", "--trainer.enable_progress_bar=false",
            "--trainer.logger=false"]


def fit(out: Path, seed: int, epochs: int, num_train: int, family: str, *extra: str) -> Path:
    """``pellucid fit`` of the family's recipe on the shortcut data; the last checkpoint (the pushed model)."""
    arguments = [arg for config in configs(family) for arg in ("--config", str(config))]
    pellucid(["fit", *arguments, *data_overrides(num_train), "--data.init_args.augment=true",
              "--trainer.accelerator=cpu", f"--trainer.max_epochs={epochs}",
              f"--trainer.default_root_dir={out}", f"--seed_everything={seed}", *extra])
    (last,) = out.rglob("last.ckpt")
    return last


def datamodule(num_train: int) -> PhantomDataModule:
    data = PhantomDataModule(spatial_dims=2, num_train=num_train, num_val=300, num_test=1000, batch_size=64,
                             shortcut=json.loads(SHORTCUT))
    data.setup("fit")
    data.setup("test")
    return data


@torch.no_grad()
def measure(checkpoint: Path, data: PhantomDataModule) -> dict[str, float]:
    """Test accuracy, marker enrichment and marker share of the predicted class's evidence."""
    model = load_checkpoint(checkpoint).model.eval()
    correct = total = 0
    enrichment, share, called, marked = [], [], [], []
    for batch in data.test_dataloader():
        output = model(batch["image"], explain=True)
        predicted = output.logits.argmax(dim=1)
        correct += int((predicted == batch["label"]).sum())
        total += len(predicted)
        maps = output.localization[torch.arange(len(predicted)), predicted]  # (B, *S)
        marker = batch["confounder_mask"].flatten(1) > 0.5
        keep = marker.any(dim=1)
        called.append(predicted == MALIGNANT)
        marked.append(keep)
        enrichment.append(marker_enrichment(maps, batch["confounder_mask"]))
        mass = maps.flatten(1)[keep].clamp_min(0)
        share.append((mass * marker[keep]).sum(dim=1) / mass.sum(dim=1).clamp_min(1e-12))
    called, marked = torch.cat(called), torch.cat(marked)
    return {"accuracy": correct / total, "marker_enrichment": float(torch.cat(enrichment).mean()),
            "marker_share": float(torch.cat(share).mean()),
            "malignant_if_marked": float(called[marked].float().mean()),  # the decision's use of the marker
            "malignant_if_unmarked": float(called[~marked].float().mean())}


@torch.no_grad()
def review(checkpoint: Path, data: PhantomDataModule, top: int, limit: int) -> Corrections:
    """A simulated reviewer: each prototype's ``top`` most activated training patches (what its gallery shows);
    every one of them that lies on the corner marker is marked forbidden (``where: activation``).

    Reads the first ``limit`` training images of the push dataset (the unaugmented training split).
    """
    module = load_checkpoint(checkpoint)
    model = module.model.eval()
    names = module.hparams.get("class_names") or []
    classes = model.prototype_classes().tolist()
    dataset = data.push_dataset() if callable(getattr(data, "push_dataset", None)) else data.train_dataloader().dataset
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(min(limit, len(dataset)))),
                                         batch_size=64)
    maps, markers, ids = [], [], []
    for batch in loader:
        maps.append(model(batch["image"], explain=True).prototype_maps)
        markers.append(batch["confounder_mask"][:, 0] > 0.5)
        ids.extend(str(i) for i in batch["id"])
    maps, markers = torch.cat(maps), torch.cat(markers)  # (N, P, h, w), (N, H, W)
    (h, w), (height, width) = maps.shape[2:], markers.shape[1:]
    corrections = Corrections(model.name, str(checkpoint))
    for prototype in range(maps.shape[1]):
        values = maps[:, prototype].flatten()
        for flat in values.topk(top).indices.tolist():
            n, row, col = flat // (h * w), (flat % (h * w)) // w, flat % w
            box = markers[n, row * height // h:(row + 1) * height // h, col * width // w:(col + 1) * width // w]
            if bool(box.any()):
                corrections.mark_activation(prototype, "forbid", {"sample_id": ids[n], "sample_index": n,
                                                                  "feature_index": [row, col]},
                                            names[classes[prototype]] if names else None, "fires on the marker")
    return corrections


def summary(rows: list[dict[str, Any]], stage: str, key: str) -> str:
    values = [row[key] for row in rows if row["stage"] == stage]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f} [{min(values):.3f}, {max(values):.3f}]"


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    data = datamodule(args.num_train)
    for seed in args.seeds:
        out = args.out / f"seed{seed}"
        before = next((out / "before").rglob("last.ckpt"), None) if args.reuse else None
        before = before or fit(out / "before", seed, args.epochs, args.num_train, args.family)
        corrections = review(before, data, args.top, args.review_images)
        path = write_corrections(corrections, out / "corrections.yaml")
        forbidden = len(corrections.marked("forbid"))
        rows.append({"seed": seed, "stage": "before", "forbidden_patches": forbidden,
                     "prototypes_on_marker": len({c.prototype for c in corrections.corrections}),
                     **measure(before, data)})
        print(json.dumps(rows[-1]), flush=True)
        tune = ["--init_from", str(before)]
        if forbidden:
            corrected = fit(out / "corrected", seed, args.finetune_epochs, args.num_train, args.family, *tune,
                            "--corrections", str(path), f"--model.loss_weights.forbid={args.forbid_weight}",
                            f"--corrections_shuffle={args.shuffle}")
            after = review(corrected, data, args.top, args.review_images).corrections
            rows.append({"seed": seed, "stage": "corrected", **measure(corrected, data),
                         "forbidden_patches": len(after),
                         "prototypes_on_marker": len({c.prototype for c in after})})
            print(json.dumps(rows[-1]), flush=True)
        control = fit(out / "control", seed, args.finetune_epochs, args.num_train, args.family, *tune)
        after = review(control, data, args.top, args.review_images).corrections
        rows.append({"seed": seed, "stage": "control", **measure(control, data), "forbidden_patches": len(after),
                     "prototypes_on_marker": len({c.prototype for c in after})})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--family", choices=PROTOTYPE_FAMILIES, default="protopnet",
                        help="the prototype family, trained with configs/model/<family>.yaml (its recipe)")
    parser.add_argument("--epochs", type=int, default=12, help="epochs of the first fit (its recipe, scaled)")
    parser.add_argument("--finetune-epochs", type=int, default=6)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--forbid-weight", type=float, default=1.0)
    parser.add_argument("--shuffle", type=float, default=1.0,
                        help="--corrections_shuffle of the corrected fine-tune (0: the forbid term alone)")
    parser.add_argument("--top", type=int, default=5, help="training patches the reviewer sees per prototype")
    parser.add_argument("--review-images", type=int, default=1000, help="training images the reviewer's gallery reads")
    parser.add_argument("--reuse", action="store_true", help="reuse a seed's existing 'before' checkpoint")
    parser.add_argument("--out", type=Path, default=Path("outputs/correction_round"))
    args = parser.parse_args(argv)
    print(json.dumps({"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}), flush=True)
    rows = run(args)
    for stage in ("before", "corrected", "control"):
        if any(row["stage"] == stage for row in rows):
            print(f"{stage:>9}: " + ", ".join(f"{key} {summary(rows, stage, key)}"
                                              for key in ("accuracy", "marker_enrichment", "marker_share")))
    if not any(row["stage"] == "corrected" for row in rows):
        sys.exit("no prototype fired on the marker in any seed: nothing to correct")


if __name__ == "__main__":
    main()
