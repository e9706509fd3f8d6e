"""The five-element report card of a trained model (and of the black-box baseline), in one run.

Trains each model with its shipped experiment config through the CLI's own code path
(``pellucid.training.evaluate.fit_config``), then writes the report card on the test split with ``evaluate_model``
(the code behind ``pellucid report``) and prints one JSON object: the headline numbers of every element for the
model and the baseline side by side, the wall times and the machine.

``--shortcut`` trains and tests on the shortcut-marker phantom (the corner marker present exactly when the lesion is
malignant, in every split) to see whether the report flags a model that learned the marker.

    python benchmarks/evaluate_explanations.py [--config configs/experiments/<model>_phantom2d.yaml]
        [--baseline-config configs/experiments/blackbox_phantom2d.yaml] [--shortcut] [--quick]
        [--out outputs/evaluate_explanations] [--threads 1] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from pellucid.training.evaluate import FitResult, evaluate_model, fit_config, machine

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "configs/experiments/blackbox_phantom2d.yaml"
QUICK = ["--trainer.max_epochs=1", "--data.init_args.num_train=256", "--data.init_args.num_val=64",
         "--data.init_args.num_test=128"]
SHORTCUT = ["--data.init_args.shortcut={train: 1.0, val: 1.0, test: 1.0}"]
HEADLINE = {"localization": ["pointing_game", "energy_inside_mask", "mask_dice", "activation_precision",
                             "constant_evidence_share"],
            "visual_recognizability": ["prototype_purity", "prototype_class_purity", "prototype_knn_class_purity"],
            "physical_attribution": ["concept_accuracy", "concept_auroc", "concept_mae/diameter_mm"],
            "transparency": ["logit_reconstruction_exact", "head_sparsity", "head_terms_per_class",
                             "deletion_faithfulness", "randomization_spearman", "randomization_flagged"],
            "actionability": ["intervention_gain", "shortcut_share", "shortcut_enrichment", "shortcut_pointing",
                              "shortcut_flagged"]}


def train(config: Path, out: Path, extra: list[str]) -> FitResult:
    """Fit with the experiment config; the result's checkpoint holds the last weights."""
    return fit_config(config, ["--trainer.logger=false", *extra], root=out, select="last")


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """Task metrics and the chosen element metrics, per role (model / baseline)."""
    rows = {m["name"]: m for section in report["elements"].values() for m in section["metrics"]}
    summary: dict[str, Any] = {}
    for role, model in report["models"].items():
        summary[role] = {"name": model["name"], "task": {k: round(v, 4) for k, v in model["task_metrics"].items()}}
        for element, names in HEADLINE.items():
            summary[role][element] = {n: None if rows.get(n, {}).get(role) is None else round(rows[n][role], 4)
                                      for n in names if n in rows}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=BASELINE, help="experiment config of the model")
    parser.add_argument("--baseline-config", type=Path, default=BASELINE, help="experiment config of the baseline")
    parser.add_argument("--no-baseline", action="store_true", help="report the model alone")
    parser.add_argument("--shortcut", action="store_true", help="train and test on the shortcut-marker phantom")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 epoch, 256 training, 128 test phantoms")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs/evaluate_explanations")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a busy box)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    extra = (QUICK if args.quick else []) + (SHORTCUT if args.shortcut else [])
    start = time.perf_counter()
    model = train(args.config, args.out / "model", extra)
    baseline, baseline_fit = None, 0.0
    if not args.no_baseline:
        if args.baseline_config.resolve() == args.config.resolve():
            baseline = model
        else:
            baseline = train(args.baseline_config, args.out / "baseline", extra)
            baseline_fit = baseline.fit_seconds
    evaluation = evaluate_model(model, model.datamodule, args.out / "report", baseline)
    report, paths = evaluation.report, evaluation.paths
    result = {
        "config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
        "baseline_config": None if args.no_baseline else str(args.baseline_config),
        "shortcut": args.shortcut, "quick": args.quick,
        "test_samples": report["models"]["model"]["samples"],
        "headline": headline(report),
        "report": str(paths.html),
        "seconds": {"fit_model": round(model.fit_seconds, 1), "fit_baseline": round(baseline_fit, 1),
                    "report": round(evaluation.seconds, 1), "total": round(time.perf_counter() - start, 1)},
        "machine": machine(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
