"""Train the provided checkpoints from their committed configs and export them as bundles in ``checkpoints/``.

For each zoo entry: fit ``configs/experiments/<config>.yaml`` through the CLI's own code path
(``pellucid.training.evaluate.fit_config``), take the checkpoint the config selects (the best validation checkpoint,
or the last one when the config monitors nothing, e.g. ProtoPNet whose last weights are the pushed ones), measure the
five-element metrics on the test split with ``evaluate_model`` (the code behind ``pellucid report``), and write the
bundle with ``pellucid.training.bundle.export_bundle``: safetensors weights, ``metadata.json`` holding the measured
metrics and the sha256, the config, and a model card. ``pellucid zoo`` then lists it; ``load_pretrained(<name>)``
loads it.

    python benchmarks/build_zoo.py                      # every entry (about an hour on 2 CPU cores)
    python benchmarks/build_zoo.py --only protopnet_phantom2d cbm_phantom2d
    python benchmarks/build_zoo.py --quick --out /tmp/zoo   # smoke run: tiny splits, one epoch, throwaway bundles
    python benchmarks/build_zoo.py --table                  # only print the README table of the bundles in --out
    python benchmarks/build_zoo.py --only blackbox_phantom3d --checkpoint <fit>/checkpoints/best-epoch=10.ckpt
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pellucid.training.bundle import export_bundle
from pellucid.training.evaluate import config_settings, evaluate_model, fit_config, machine

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "configs" / "experiments"
QUICK = ["--trainer.max_epochs=1", "--data.init_args.num_train=64", "--data.init_args.num_val=32",
         "--data.init_args.num_test=32"]


@dataclass(frozen=True)
class ZooEntry:
    """One provided checkpoint: its bundle name, the experiment config that trains it, its model-card summary."""

    name: str
    config: str
    description: str


ZOO = (
    ZooEntry("blackbox_phantom2d", "blackbox_phantom2d",
             "Black-box baseline (small MONAI residual encoder, global pooling, linear head) on the 2D phantom "
             "benchmark; its localization is Grad-CAM. Reports compare interpretable models against it."),
    ZooEntry("blackbox_resnet10_phantom2d", "blackbox_resnet10_phantom2d",
             "Black-box baseline on MONAI ResNet-10 on the 2D phantom benchmark; Grad-CAM localization."),
    ZooEntry("protopnet_phantom2d", "protopnet_phantom2d",
             "ProtoPNet (10 prototypes per class, squared-L2, each pushed onto its own training patch) on the 2D "
             "phantom benchmark: the family's recipe over 40 augmented epochs, cubic class evidence, mask guidance "
             "at input resolution and concept guidance. Prototype provenance is in metadata.json."),
    ZooEntry("protopnet_cosine_phantom2d", "protopnet_cosine_phantom2d",
             "ProtoPNet with cosine distance on the 2D phantom benchmark: the 2D ProtoPNet's recipe (40 epochs, "
             "augmentation), mask guidance on the cubic class evidence at input resolution and concept guidance."),
    ZooEntry("xprotonet_phantom2d", "xprotonet_phantom2d",
             "XProtoNet (a learned occurrence map per prototype) on the 2D phantom benchmark: the family's recipe "
             "over 16 epochs, mask guidance on the feature cells (temperature 0.1), cubic class evidence."),
    ZooEntry("pipnet_phantom2d", "pipnet_phantom2d",
             "PIP-Net (32 prototypes shared by the classes, softmax patch presence learned self-supervised, sparse "
             "non-negative scoring sheet, abstention on unfamiliar input) on the 2D phantom benchmark. Each "
             "prototype's source patch (the training patch where it is most present) is in metadata.json."),
    ZooEntry("cbm_phantom2d", "cbm_phantom2d",
             "Concept bottleneck model, joint training, on the 2D phantom benchmark: image -> the phantom's clinical "
             "findings (diameter in mm, contrast, irregular outline, spiculated, calcified) -> linear label head; "
             "each present finding's concept map guided onto the lesion mask in training."),
    ZooEntry("cbm_spatial_phantom2d", "cbm_spatial_phantom2d",
             "Concept bottleneck model reading each concept through its own spatial attention (concept_maps), "
             "joint training, on the 2D phantom benchmark; the attention of each present finding and of each "
             "measurement of the lesion (diameter, contrast) guided onto the lesion mask in training."),
    ZooEntry("cem_phantom2d", "cem_phantom2d",
             "Concept embedding model (RandInt training-time interventions) on the 2D phantom benchmark; each present "
             "finding's concept map guided onto the lesion mask in training."),
    ZooEntry("attention_unet_phantom2d", "attention_unet_phantom2d",
             "Attention U-Net segmenting lesions on the 2D phantom benchmark (12 epochs, a small gate-sparsity "
             "term); every gate's coefficient map is returned."),
    ZooEntry("attention_classifier_phantom2d", "attention_classifier_phantom2d",
             "Attention-gated classifier (grid attention gates, concatenated gated features) on the 2D phantom "
             "benchmark; the true class's evidence guided onto the lesion mask in training (weight 0.1)."),
    ZooEntry("bcos_phantom2d", "bcos_phantom2d",
             "B-cos network (dynamic-linear B-cos ResNet, B=2, average pooling, binary cross-entropy) on the 2D "
             "phantom benchmark; its localization is the positive part of its exact contributions W(x)·x, which sum "
             "to the logits."),
    ZooEntry("blackbox_phantom3d", "blackbox_phantom3d",
             "Black-box baseline (small MONAI residual encoder at stride 4, global pooling, linear head) on the 3D "
             "phantom benchmark (32^3 volumes, 2 mm voxels); Grad-CAM localization. 3D reports compare against it."),
    ZooEntry("protopnet_phantom3d", "protopnet_phantom3d",
             "ProtoPNet on the 3D phantom benchmark (32^3 volumes, 2 mm voxels) on its earlier settings (2,000 "
             "volumes, stride-8 encoder), the family's recipe and expert-mask guidance; it does not learn (accuracy "
             "0.44, docs/benchmarks/diagnose_3d.md). Prototype provenance is in metadata.json."),
    ZooEntry("bcos_phantom3d", "bcos_phantom3d",
             "B-cos network (3D B-cos ResNet, B=2, average pooling, binary cross-entropy) on the 3D phantom benchmark; "
             "its localization is the positive part of its exact contributions W(x)·x."),
    ZooEntry("pipnet_phantom3d", "pipnet_phantom3d",
             "PIP-Net (32 shared prototypes, sparse non-negative scoring sheet, abstention) on the 3D phantom "
             "benchmark with the family's recipe and mask guidance as in 2D."),
    ZooEntry("cbm_phantom3d", "cbm_phantom3d",
             "Concept bottleneck model, joint training, on the 3D phantom benchmark: volume -> the phantom's findings "
             "-> linear label head; mask guidance (weight 1) puts each present finding's and each measurement's "
             "concept map on the lesion."),
    ZooEntry("xprotonet_phantom3d", "xprotonet_phantom3d",
             "XProtoNet (a learned occurrence map per prototype) on the 3D phantom benchmark with the family's recipe "
             "and mask guidance as in 2D."),
    ZooEntry("cbm_spatial_phantom3d", "cbm_spatial_phantom3d",
             "Concept bottleneck model reading each finding through its own 3D attention map (concept_maps), joint "
             "training, on the 3D phantom benchmark; each present finding's attention guided onto the lesion mask in "
             "training."),
    ZooEntry("cem_phantom3d", "cem_phantom3d",
             "Concept embedding model (RandInt training-time interventions) on the 3D phantom benchmark; each present "
             "finding's concept map guided onto the lesion mask in training."),
    ZooEntry("attention_classifier_phantom3d", "attention_classifier_phantom3d",
             "Attention-gated classifier on the 3D phantom benchmark (32^3 volumes, 2 mm voxels); the true class's "
             "evidence guided onto the lesion mask in training (weight 1, temperature 0.025)."),
    ZooEntry("attention_unet_phantom3d", "attention_unet_phantom3d",
             "Attention U-Net segmenting lesions on the 3D phantom benchmark (32^3 volumes, 2 mm voxels)."),
)


def build(entry: ZooEntry, out: Path, work: Path, overrides: list[str], checkpoint: Path | None = None
          ) -> dict[str, Any]:
    """Train (or take ``checkpoint``, a finished fit of the entry's config), evaluate and export one entry; return
    what was measured."""
    config = EXPERIMENTS / f"{entry.config}.yaml"
    root = work / entry.name
    # the checkpoint the config selects (best, else last), or the given one
    fit = fit_config(config, overrides, root=root, checkpoint=checkpoint)
    evaluation = evaluate_model(fit, fit.datamodule, root / "report")
    report, metrics = evaluation.report, evaluation.metrics
    module = fit.selected_module()  # the selected checkpoint's weights (and prototype provenance)
    datamodule = fit.datamodule
    data = {"dataset": "pellucid phantom benchmark", "spatial_dims": datamodule.spatial_dims,
            "seed": datamodule.seed, "splits": dict(datamodule.split_sizes),
            "evaluated_on": f"test split ({report['models']['model'].get('samples')} samples)",
            "checkpoint": fit.checkpoint.name,
            "epochs": fit.epochs if fit.fit_seconds is not None else config_settings(config, "trainer")["max_epochs"],
            "augment": bool(datamodule.hparams.get("augment", False))}
    guidance = [name.replace("_", " ") for name in ("mask_guidance", "concept_guidance")
                if getattr(module.model, name, False)]
    if guidance:  # annotations beyond the labels that shaped the model
        data["guided_by"] = ", ".join(guidance)
    generator = datamodule.phantom_generator
    input_spec = {"image_size": list(generator.shape), "spacing_mm": [float(s) for s in generator.spacing_mm],
                  "intensity": "phantom intensities, roughly in [0, 1]; no further normalisation"}
    bundle = export_bundle(module, out / entry.name, entry.name, description=entry.description,
                           config_path=config, data=data, metrics=metrics, input_spec=input_spec)
    size = sum(f.stat().st_size for f in bundle.iterdir())
    return {"bundle": str(bundle), "bytes": size,
            "fit_seconds": None if fit.fit_seconds is None else round(fit.fit_seconds, 1),
            "report_seconds": round(evaluation.seconds, 1), "metrics": metrics}


TABLE_COLUMNS = {"test/accuracy": "accuracy", "test/balanced_accuracy": "balanced acc.", "test/auroc": "AUROC",
                 "test/dice": "lesion Dice", "localization/pointing_game": "pointing game",
                 "localization/energy_inside_mask": "energy in mask",
                 "visual_recognizability/prototype_purity": "prototype purity",
                 "physical_attribution/concept_accuracy": "concept acc.",
                 "physical_attribution/concept_map_pointing_game": "finding maps on lesion",
                 "transparency/deletion_faithfulness": "deletion faithfulness"}


def _tie_mark(key: str, metrics: dict[str, Any]) -> str:
    """``*`` on a deletion score measured before deletion curves took tied pixels as one block (no tied share)."""
    old = key == "transparency/deletion_faithfulness" and "transparency/deletion_tied_share" not in metrics
    return "*" if old else ""


def markdown_table(out: Path) -> str:
    """The README table of the bundles in ``out``: architecture, dimensions, size and the measured test metrics."""
    header = ["bundle", "model", "dims", "size", *TABLE_COLUMNS.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in ZOO:
        metadata_file = out / entry.name / "metadata.json"
        if not metadata_file.is_file():
            continue
        metadata = json.loads(metadata_file.read_text(encoding="utf-8"))
        size = sum(f.stat().st_size for f in (out / entry.name).iterdir()) / 2**20
        metrics = metadata["metrics"]
        values = [f"{metrics[key]:.3f}{_tie_mark(key, metrics)}" if isinstance(metrics.get(key), int | float) else "–"
                  for key in TABLE_COLUMNS]
        lines.append("| " + " | ".join([f"`{entry.name}`", f"`{metadata['model']['name']}`",
                                        f"{metadata['spatial_dims']}D", f"{size:.1f} MB", *values]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Build the requested entries and print a JSON summary."""
    names = [entry.name for entry in ZOO]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=names, help="build only these entries")
    parser.add_argument("--out", type=Path, default=ROOT / "checkpoints", help="bundle folder")
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "zoo", help="training logs and reports")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny splits, one epoch")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("--table", action="store_true", help="print the README table of the bundles in --out, only")
    parser.add_argument("--checkpoint", type=Path,
                        help="export this finished fit of the one --only entry's config (same config and seed, e.g. "
                             "from benchmarks/diagnose_3d.py) instead of training it again")
    args = parser.parse_args(argv)
    if args.checkpoint is not None and (args.only is None or len(args.only) != 1):
        parser.error(f"--checkpoint {args.checkpoint} needs exactly one --only entry, got {args.only}")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        parser.error(f"--checkpoint {args.checkpoint} is not a file; pass the .ckpt of a finished fit")
    if args.table:
        print(markdown_table(args.out))
        return {}
    selected = [entry for entry in ZOO if args.only is None or entry.name in args.only]
    summary: dict[str, Any] = {"machine": machine(), "quick": args.quick, "entries": {}}
    for entry in selected:
        print(f"--- {entry.name}", file=sys.stderr, flush=True)
        summary["entries"][entry.name] = build(entry, args.out, args.work, QUICK if args.quick else [],
                                               args.checkpoint)
    summary["machine"]["load_average_at_end"] = machine()["load_average"][0]
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return summary


if __name__ == "__main__":
    main()
