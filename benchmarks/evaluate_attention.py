"""Train and test the attention-gated networks on the phantom benchmark; print their numbers.

Trains each shipped experiment config through the same code path as ``pellucid fit``
(``pellucid.training.evaluate.fit_config``), tests the best checkpoint on the test split, and prints one JSON
document: task metrics, per-gate-level localization (pointing game, energy inside the mask, Dice of the map
thresholded at 0.5), wall times, the machine, and the issue's targets checked. The black-box baseline
(``configs/experiments/blackbox_phantom2d.yaml``) is trained in the same run, on the same machine, unless its test
accuracy is passed with ``--baseline-accuracy``.

    python benchmarks/evaluate_attention.py                 # 2D segmenter, 2D classifier, black-box baseline
    python benchmarks/evaluate_attention.py --with-3d       # ... and the two 3D configs
    python benchmarks/evaluate_attention.py --quick         # smoke run: tiny splits, one epoch each
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from pellucid.training.evaluate import fit_config, machine

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "configs" / "experiments"
SEGMENTER_2D = "attention_unet_phantom2d"
CLASSIFIER_2D = "attention_classifier_phantom2d"
BASELINE_2D = "blackbox_phantom2d"
RUNS_3D = ("attention_unet_phantom3d", "attention_classifier_phantom3d")
QUICK_OVERRIDES = ["--trainer.max_epochs=1", "--data.init_args.num_train=64", "--data.init_args.num_val=32",
                   "--data.init_args.num_test=32"]
TARGETS = {"segmenter_dice": 0.80, "classifier_accuracy_gap_points": 2.0, "gate_pointing_game": 0.90}


def train_and_test(name: str, root: Path, overrides: list[str]) -> dict[str, Any]:
    """Fit ``configs/experiments/<name>.yaml``, test its best checkpoint, return metrics and timings.

    The gate levels' localization is in the test metrics: the configs' gate callback logs it.
    """
    fit = fit_config(EXPERIMENTS / f"{name}.yaml", overrides, root=root / name, test=True)
    return {"config": f"configs/experiments/{name}.yaml", "epochs": fit.epochs,
            "fit_seconds": round(fit.fit_seconds, 1), "test_seconds": round(fit.test_seconds, 1),
            "checkpoint": str(fit.checkpoint), "test": dict(sorted(fit.test.items()))}


def per_level(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """``{"gate_0": {"pointing_game": ..., ...}, "localization": {...}}`` from ``test/<level>/<metric>`` keys."""
    table: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and (parts[1].startswith("gate_") or parts[1] == "localization"):
            table.setdefault(parts[1], {})[parts[2]] = round(value, 4)
    return table


def check_targets(runs: dict[str, dict[str, Any]], baseline_accuracy: float | None) -> dict[str, Any]:
    """The issue's numbers: segmenter Dice, classifier accuracy gap to the baseline, best gate pointing game."""
    checks: dict[str, Any] = {}
    if SEGMENTER_2D in runs:
        dice = runs[SEGMENTER_2D]["test"]["test/dice"]
        checks["segmenter_dice"] = {"value": round(dice, 4), "target": f">= {TARGETS['segmenter_dice']}",
                                    "met": dice >= TARGETS["segmenter_dice"]}
    if CLASSIFIER_2D in runs:
        test = runs[CLASSIFIER_2D]["test"]
        if baseline_accuracy is not None:
            gap = 100 * (baseline_accuracy - test["test/accuracy"])
            checks["classifier_accuracy_gap_points"] = {
                "value": round(gap, 2), "classifier": round(test["test/accuracy"], 4),
                "baseline": round(baseline_accuracy, 4),
                "target": f"<= {TARGETS['classifier_accuracy_gap_points']}",
                "met": gap <= TARGETS["classifier_accuracy_gap_points"]}
        levels = {level: values["pointing_game"] for level, values in per_level(test).items()
                  if level.startswith("gate_")}
        if levels:
            best = max(levels, key=levels.get)
            checks["gate_pointing_game"] = {"value": levels[best], "level": best, "per_level": levels,
                                            "target": f">= {TARGETS['gate_pointing_game']}",
                                            "met": levels[best] >= TARGETS["gate_pointing_game"]}
    return checks


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the evaluation and print (and optionally write) its JSON report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny splits, one epoch per config")
    parser.add_argument("--with-3d", action="store_true", help="also train and test the 3D configs")
    parser.add_argument("--baseline-accuracy", type=float, default=None,
                        help="black-box test accuracy to compare with instead of training the baseline here")
    parser.add_argument("--root", type=Path, default=Path("outputs/evaluate_attention"), help="logs and checkpoints")
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON report to this file")
    args = parser.parse_args(argv)

    overrides = QUICK_OVERRIDES if args.quick else []
    names = [SEGMENTER_2D, CLASSIFIER_2D]
    if args.baseline_accuracy is None:
        names.append(BASELINE_2D)
    if args.with_3d:
        names.extend(RUNS_3D)
    report: dict[str, Any] = {"machine": machine(), "quick": args.quick, "runs": {}}
    start = time.perf_counter()
    for name in names:
        print(f"--- {name}", file=sys.stderr, flush=True)
        report["runs"][name] = train_and_test(name, args.root, overrides)
        report["runs"][name]["levels"] = per_level(report["runs"][name]["test"])
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    report["machine"]["load_average_at_end"] = machine()["load_average"]  # shared machines: say how busy it was
    baseline = args.baseline_accuracy
    if baseline is None:
        baseline = report["runs"][BASELINE_2D]["test"]["test/accuracy"]
        report["baseline"] = "trained in this run"
    else:
        report["baseline"] = "passed with --baseline-accuracy"
    report["targets"] = check_targets(report["runs"], baseline)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
