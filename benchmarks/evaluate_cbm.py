"""Evaluate concept models on the phantom benchmark: train with a shipped experiment config, test, and report.

Trains each config through the same code path as ``pellucid fit`` (``pellucid.training.evaluate.fit_config``),
tests the best checkpoint on the test split, and measures on that split
(``pellucid.training.evaluate_measures.concept_evaluation``):

- task accuracy / balanced accuracy / AUROC, next to the black-box baseline trained in the same run for as many
  epochs, on the same augmentation, as the (first) evaluated config (``same_budget_overrides``);
- per-concept accuracy and AUROC (binary), MAE in the unit (continuous); leakage (soft vs hard concepts);
- intervention curves (random, uncertainty-first, by group): accuracy per number of concepts corrected, AUC, gain;
- transparency: the label head as a table, its agreement with LABEL_RULE from true concepts, the signs and ratios
  of its malignant-vs-benign weights against the rule's points, and the diameter threshold it implies;
- localization: pointing game and energy inside the lesion mask of the true class's map; the pointing game of each
  concept's map (``concept_maps``) on the scans that show the concept, and pooled over the binary lesion findings.

    python benchmarks/evaluate_cbm.py                                   # joint CBM + black-box baseline
    python benchmarks/evaluate_cbm.py --config configs/experiments/cem_phantom2d.yaml --no-baseline
    python benchmarks/evaluate_cbm.py --quick                           # smoke run (tiny data, one epoch)
    python benchmarks/evaluate_cbm.py --ckpt <checkpoint> --no-baseline   # re-measure a checkpoint, no training
    python benchmarks/evaluate_cbm.py --config configs/experiments/cbm_phantom2d.yaml --no-baseline \
        --cli-arg=--model.model=cbm_spatial                             # the spatial-concept variant

Every run prints one JSON report (also written to ``--output``), then a short summary with the wall time and the
machine. On a machine other jobs keep busy, ``OMP_NUM_THREADS=1`` is often faster than two threads fighting them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from pellucid.training.evaluate import fit_config, machine, same_budget_overrides
from pellucid.training.evaluate_measures import concept_evaluation

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/experiments/cbm_phantom2d.yaml"
BASELINE_CONFIG = "configs/experiments/blackbox_phantom2d.yaml"
QUICK = ["--trainer.max_epochs=1", "--data.init_args.num_train=128", "--data.init_args.num_val=64",
         "--data.init_args.num_test=64", "--data.init_args.batch_size=32"]
TRIALS = {"random": 10, "uncertainty": 1, "group": 10}  # random orders per curve (3 left a one-image dip)


def train_and_test(config: str, quick: bool, root: Path, extra: list[str],
                   checkpoint: str | None = None) -> tuple[Any, dict[str, float], float | None]:
    """Fit with ``config`` as ``pellucid fit`` would, test the best checkpoint; return (fit, test metrics, seconds).

    With ``checkpoint`` (a ``.ckpt`` trained with ``config``) nothing is trained: that checkpoint is tested.
    """
    fit = fit_config(ROOT / config, [*extra, *(QUICK if quick else [])], root=root / Path(config).stem,  # --quick wins
                     checkpoint=checkpoint, test=True)
    return fit, fit.test, fit.fit_seconds


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A short human-readable table of the headline numbers."""
    lines = []
    baseline = report.get("baseline")
    if baseline:
        lines.append(f"baseline {baseline['config']}: test accuracy {baseline['test']['test/accuracy']:.3f}, "
                     f"balanced {baseline['test']['test/balanced_accuracy']:.3f}, fit {baseline['fit_seconds']:.0f} s")
    for run in report["runs"]:
        test, c = run["test"], run["concepts"]
        continuous = ", ".join(f"{k} {v:.3f}" for k, v in c.items() if "/mae" in k)
        curve = run["interventions"]["random"]["accuracy"]
        lines += [
            f"{run['config']}: test accuracy {test['test/accuracy']:.3f}, balanced {test['test/balanced_accuracy']:.3f}"
            f", AUROC {test['test/auroc']:.3f}, " + (f"fit {run['fit_seconds']:.0f} s" if run["fit_seconds"] is not None
                                                     else f"checkpoint {run['checkpoint']}"),
            f"  concepts: mean binary accuracy {c['binary_accuracy']:.3f}, AUROC {c['binary_auroc']:.3f}; {continuous}",
            f"  interventions (random): {' '.join(f'{a:.3f}' for a in curve)}; all true -> {curve[-1]:.3f}; "
            f"monotonic {run['interventions']['random']['monotonic']}",
            f"  leakage: soft {run['leakage']['soft_accuracy']:.3f}, hard {run['leakage']['hard_accuracy']:.3f}; "
            f"head vs rule on true concepts {run['transparency']['head_agrees_with_rule_on_true_concepts']:.3f}",
            f"  class map (true class): pointing game {run['localization']['pointing_game']:.3f}, energy in mask "
            f"{run['localization']['energy_inside_mask']:.3f}",
        ]
        if "concept_map_pointing_game" in run:
            lines.append("  concept-map pointing game (scans showing the concept): " + ", ".join(
                f"{k} {v:.3f}" for k, v in run["concept_map_pointing_game"].items()))
        for name, bins in run["binary_accuracy_on_lesions_by_diameter_mm"].items():
            lines.append(f"  {name} accuracy on lesions by diameter (mm): "
                         + ", ".join(f"{k} {v:.3f}" for k, v in bins.items()))
        transparency = run["transparency"]
        if "sign_agreement" in transparency:
            ratios = ", ".join(f"{k} {v:+.2f}" for k, v in transparency["binary_weights_per_irregular"].items())
            lines.append(f"  head vs rule: sign agreement {transparency['sign_agreement']:.2f}; malignant-benign "
                         f"weights per irregular: {ratios} (rule +2, +1, -1); implied diameter threshold "
                         f"{transparency['implied_diameter_threshold_mm']:.1f} mm (rule 10)")
        if baseline:
            lines.append(f"  accuracy minus baseline: "
                         f"{test['test/accuracy'] - baseline['test']['test/accuracy']:+.3f}")
        lines += [f"  {row}" for row in run["transparency"].get("head_table", [])]
    lines.append(f"wall time {report['wall_seconds']:.0f} s on {report['machine']['cpu_count']} CPUs "
                 f"({report['machine']['processor']})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help=f"experiment config(s) (default {DEFAULT_CONFIG})")
    parser.add_argument("--baseline", default=BASELINE_CONFIG, help="black-box config trained for comparison")
    parser.add_argument("--no-baseline", action="store_true", help="skip training the black-box baseline")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny splits, one epoch")
    parser.add_argument("--cli-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for every pellucid run, e.g. --cli-arg=--trainer.max_epochs=8")
    parser.add_argument("--output", help="also write the JSON report to this file")
    parser.add_argument("--keep", help="folder for checkpoints and logs (default: a temporary folder)")
    parser.add_argument("--ckpt", help="evaluate this checkpoint of the (one) --config instead of training it")
    parser.add_argument("--trials", type=int, default=TRIALS["random"],
                        help=f"trials of the random and group intervention policies (default {TRIALS['random']})")
    arguments = parser.parse_args()
    if arguments.ckpt and len(arguments.config or [DEFAULT_CONFIG]) != 1:
        parser.error("--ckpt evaluates one checkpoint: give at most one --config (the one it was trained with)")
    os.environ.setdefault("WANDB_MODE", "offline")
    trials = {"random": arguments.trials, "uncertainty": TRIALS["uncertainty"], "group": arguments.trials}
    trials = {k: 1 for k in TRIALS} if arguments.quick else trials
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="evaluate_cbm_") as scratch:
        root = Path(arguments.keep or scratch)
        report: dict[str, Any] = {"runs": [], "quick": arguments.quick, "cli_args": arguments.cli_arg,
                                  "machine": machine()}
        for config in arguments.config or [DEFAULT_CONFIG]:
            fit, test, seconds = train_and_test(config, arguments.quick, root, arguments.cli_arg, arguments.ckpt)
            batches = list(fit.datamodule.test_dataloader())
            report["runs"].append({"config": config, "checkpoint": arguments.ckpt, "model": fit.module.model.name,
                                   "test": test, "fit_seconds": seconds,
                                   **concept_evaluation(fit.module.model, batches, trials)})
        if not arguments.no_baseline:  # trained for as many epochs, on the same augmentation, as the first config
            budget = same_budget_overrides(ROOT / (arguments.config or [DEFAULT_CONFIG])[0])
            _, test, seconds = train_and_test(arguments.baseline, arguments.quick, root, budget + arguments.cli_arg)
            report["baseline"] = {"config": arguments.baseline, "overrides": budget, "test": test,
                                  "fit_seconds": seconds}
    report["wall_seconds"] = time.perf_counter() - start
    text = json.dumps(report, indent=2)
    if arguments.output:
        Path(arguments.output).write_text(text)
    print(text)
    print("\n".join(summary_lines(report)))


if __name__ == "__main__":
    main()
