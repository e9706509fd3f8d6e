"""Write the measured numbers over training seeds into the shipped bundles' metadata and model cards.

Each entry below is copied from the per-seed tables of the doc it names (seed 0 is the bundle's run; the other
seeds from ``benchmarks/sweep_config.py <config> --variant shipped= --seeds 1 2 --texture-seeds 7``, or from
``evaluate_pipnet.py`` / ``evaluate_bcos.py`` as their docs say; test split of 1,000 scans in 2D, 300 volumes in 3D,
and the unseen-texture phantom, data seed 7). 2D bundles: seeds 0-2; 3D bundles: seeds 0-1. Rerun after a sweep
changes them:

    python benchmarks/record_seed_summaries.py [--only NAME ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pellucid.training.bundle import record_seed_summary

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "docs/benchmarks/mask_guidance.md"
UNSEEN = "phantom seed 7 (tissue textures training never saw)"
BLACK_BOX_16 = "black box, 16 epochs, seeds 0-2: accuracy 0.906 +- 0.003 (unseen 0.912 +- 0.005)"
BLACK_BOX_3D = ("3D black box (4,000 volumes, stride 4, 16 epochs), seeds 0-1: accuracy 0.832 +- 0.028 (0.860, 0.803; "
                "unseen 0.847 +- 0.013)")
SOURCE_3D = "docs/benchmarks/diagnose_3d.md"
BLACK_BOX_40 = "black box, 40 augmented epochs, seeds 0-2: accuracy 0.946 +- 0.005 (unseen 0.951 +- 0.006)"


def _metric(values: list[float], unseen: list[float] | None = None) -> dict[str, list[float]]:
    return {"values": values, **({"unseen": unseen} if unseen else {})}


def _summary(metrics: dict[str, dict[str, list[float]]], baseline: str, source: str = SOURCE) -> dict[str, Any]:
    return {"seeds": [0, 1, 2], "bundle_seed": 0, "evaluated_on": "test split (1,000 scans)", "unseen": UNSEEN,
            "metrics": metrics, "baseline": baseline, "source": source}


def _summary_3d(metrics: dict[str, dict[str, list[float]]], baseline: str = BLACK_BOX_3D,
                source: str = SOURCE_3D) -> dict[str, Any]:
    return {**_summary(metrics, baseline, source), "seeds": [0, 1], "evaluated_on": "test split (300 volumes)"}


SUMMARIES: dict[str, dict[str, Any]] = {
    "protopnet_phantom2d": _summary({
        "accuracy": _metric([0.934, 0.927, 0.940], [0.948, 0.923, 0.942]),
        "pointing_game": _metric([0.997, 0.955, 0.996], [0.996, 0.945, 0.996]),
        "prototype_purity": _metric([0.730, 0.680, 0.770], [0.717, 0.693, 0.747])}, BLACK_BOX_40),
    "xprotonet_phantom2d": _summary({
        "accuracy": _metric([0.889, 0.894, 0.895], [0.901, 0.889, 0.901]),
        "pointing_game": _metric([0.935, 0.948, 0.950], [0.926, 0.933, 0.926]),
        "prototype_purity": _metric([0.491, 0.496, 0.436], [0.430, 0.559, 0.488])}, BLACK_BOX_16,
        "docs/tuning_history.md"),
    "attention_unet_phantom2d": _summary({
        "dice": _metric([0.956, 0.955, 0.964], [0.957, 0.956, 0.965]),
        "pointing_game (gates)": _metric([0.999, 1.000, 0.905], [1.000, 0.999, 0.895])},
        "none; a segmenter (lesion Dice against the phantom's masks)", "docs/tuning_history.md"),
    "blackbox_resnet10_phantom2d": _summary({
        "accuracy": _metric([0.914, 0.907, 0.897], [0.928, 0.906, 0.906]),
        "pointing_game (Grad-CAM)": _metric([0.285, 0.339, 0.279], [0.285, 0.336, 0.270])},
        "none; the black box on MONAI's ResNet-10 (16 epochs), beside the small-encoder black box",
        "docs/tuning_history.md"),
    "protopnet_cosine_phantom2d": _summary({
        "accuracy": _metric([0.941, 0.948, 0.939], [0.953, 0.946, 0.950]),
        "pointing_game": _metric([0.999, 1.000, 0.997], [0.996, 0.994, 0.996]),
        "prototype_purity": _metric([0.697, 0.710, 0.687], [0.767, 0.693, 0.737])}, BLACK_BOX_40),
    "cem_phantom2d": _summary({
        "accuracy": _metric([0.943, 0.941, 0.949], [0.934, 0.941, 0.948]),
        "concept_map_pointing_game": _metric([0.926, 0.923, 0.928], [0.920, 0.912, 0.923]),
        "pointing_game": _metric([0.926, 0.935, 0.926], [0.912, 0.918, 0.914])}, BLACK_BOX_16),
    "cbm_phantom2d": _summary({
        "accuracy": _metric([0.963, 0.963, 0.962], [0.971, 0.956, 0.966]),
        "concept_map_pointing_game": _metric([0.926, 0.922, 0.926], [0.918, 0.925, 0.918]),
        "pointing_game": _metric([0.594, 0.533, 0.522], [0.580, 0.536, 0.514])}, BLACK_BOX_40),
    "cbm_spatial_phantom2d": _summary({
        "accuracy": _metric([0.938, 0.934, 0.935], [0.937, 0.935, 0.938]),
        "concept_map_pointing_game": _metric([0.938, 0.934, 0.930], [0.925, 0.923, 0.923]),
        "pointing_game": _metric([0.903, 0.899, 0.912], [0.878, 0.878, 0.906])}, BLACK_BOX_16),
    "attention_classifier_phantom2d": _summary({
        "accuracy": _metric([0.901, 0.899, 0.900], [0.899, 0.900, 0.899]),
        "pointing_game": _metric([0.906, 0.898, 0.909], [0.915, 0.923, 0.926])}, BLACK_BOX_16),
    "pipnet_phantom2d": _summary({
        "accuracy": _metric([0.907, 0.915, 0.921], [0.922, 0.921, 0.932]),
        "pointing_game": _metric([0.999, 0.999, 0.999], [0.999, 0.997, 0.999]),
        "abstained_on_test_scans": _metric([0.025, 0.014, 0.020], [0.016, 0.019, 0.021])}, BLACK_BOX_16,
        "docs/benchmarks/pipnet.md"),
    "bcos_phantom2d": _summary({
        "accuracy": _metric([0.910, 0.910, 0.914], [0.917, 0.911, 0.917]),
        "pointing_game": _metric([0.994, 0.985, 0.996], [0.991, 0.966, 0.996])}, BLACK_BOX_16,
        "docs/benchmarks/bcos.md"),
    "blackbox_phantom2d": _summary({
        "accuracy": _metric([0.903, 0.904, 0.910], [0.918, 0.907, 0.910]),
        "pointing_game (Grad-CAM)": _metric([0.339, 0.241, 0.297], [0.309, 0.260, 0.306])},
        "none; this bundle is the 16-epoch black box the 2D families are compared with", "docs/benchmarks/bcos.md"),
    "cbm_phantom3d": _summary_3d({
        "accuracy": _metric([0.850, 0.857], [0.853, 0.853]),
        "concept_map_pointing_game": _metric([0.880, 0.892], [0.894, 0.914]),
        "pointing_game": _metric([0.757, 0.539], [0.748, 0.540])}),
    "cem_phantom3d": _summary_3d({
        "accuracy": _metric([0.853, 0.847], [0.867, 0.883]),
        "concept_map_pointing_game": _metric([0.880, 0.883], [0.927, 0.921]),
        "pointing_game": _metric([0.854, 0.587], [0.864, 0.586])}),
    "xprotonet_phantom3d": _summary_3d({
        "accuracy": _metric([0.763, 0.817], [0.790, 0.867]),
        "pointing_game": _metric([0.820, 0.869], [0.828, 0.909])}),
    "cbm_spatial_phantom3d": _summary_3d({
        "accuracy": _metric([0.827, 0.847], [0.853, 0.860]),
        "concept_map_pointing_game": _metric([0.892, 0.898], [0.924, 0.927]),
        "pointing_game": _metric([0.800, 0.830], [0.822, 0.853])}),
    "attention_classifier_phantom3d": _summary_3d({
        "accuracy": _metric([0.827, 0.840], [0.850, 0.873]),
        "pointing_game": _metric([0.869, 0.437], [0.874, 0.414])}),
    "attention_unet_phantom3d": _summary_3d({
        "dice": _metric([0.869, 0.870], [0.865, 0.862]),
        "pointing_game (gates)": _metric([0.947, 0.757], [0.960, 0.793])},
        "none; a segmenter (lesion Dice against the phantom's masks)"),
    "blackbox_phantom3d": _summary_3d({
        "accuracy": _metric([0.860, 0.803], [0.860, 0.833]),
        "pointing_game (Grad-CAM)": _metric([0.078, 0.005], [0.096, 0.015])},
        "none; this bundle is the 3D black box the 3D families are compared with", "docs/benchmarks/bcos.md"),
    "bcos_phantom3d": _summary_3d({
        "accuracy": _metric([0.857, 0.857], [0.860, 0.873]),
        "pointing_game": _metric([0.990, 0.956], [0.975, 0.950])}, source="docs/benchmarks/bcos.md"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(SUMMARIES), default=sorted(SUMMARIES))
    parser.add_argument("--out", type=Path, default=ROOT / "checkpoints", help="the folder holding the bundles")
    args = parser.parse_args(argv)
    for name in args.only:
        print(record_seed_summary(args.out / name, SUMMARIES[name]))


if __name__ == "__main__":
    main()
