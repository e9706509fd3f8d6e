"""Evaluate concept models on the phantom benchmark: train with a shipped experiment config, test, and report.

Trains each config through the same code path as ``pellucid fit`` (``build_cli`` + ``trainer.fit``), tests the best
checkpoint on the test split, and measures on that split:

- task accuracy / balanced accuracy / AUROC, next to the black-box baseline trained in the same run for as many
  epochs, on the same augmentation, as the (first) evaluated config (``same_budget.py``);
- per-concept accuracy and AUROC (binary), MAE in the unit (continuous); leakage (soft vs hard concepts);
- intervention curves (random, uncertainty-first, by group): accuracy per number of concepts corrected, AUC, gain;
- transparency: the label head as a table, its agreement with LABEL_RULE from true concepts, the signs and ratios
  of its malignant-vs-benign weights against the rule's points, and the diameter threshold it implies;
- localization: pointing game and energy inside the lesion mask of the true class's map; per-concept maps too when
  the model returns ``concept_maps``.

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
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from same_budget import same_budget_overrides

from pellucid.training.cli import build_cli
from pellucid.training.concept_metrics import (
    ConceptMetrics,
    LeakageCheck,
    concept_maps_at_input,
    head_rule_agreement,
    soft_and_hard_logits,
)
from pellucid.training.data.phantom_rule import LABEL_RULE, PHANTOM_CLASSES
from pellucid.training.interventions import POLICIES, evaluate_interventions
from pellucid.training.localization import EnergyInsideMask, PointingGame, class_maps

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/experiments/cbm_phantom2d.yaml"
BASELINE_CONFIG = "configs/experiments/blackbox_phantom2d.yaml"
QUICK = ["--trainer.max_epochs=1", "--data.init_args.num_train=128", "--data.init_args.num_val=64",
         "--data.init_args.num_test=64", "--data.init_args.batch_size=32"]
RULE_POINTS = {"spiculated": LABEL_RULE.spiculated_points, "irregular": LABEL_RULE.irregular_points,
               "calcified": LABEL_RULE.calcified_points}
TRIALS = {"random": 10, "uncertainty": 1, "group": 10}  # random orders per curve (3 left a one-image dip)
DIAMETER_BINS_MM = ((4.0, 8.0), (8.0, 12.0), (12.0, 16.0), (16.0, 20.01))


def train_and_test(config: str, quick: bool, root: Path, extra: list[str],
                   checkpoint: str | None = None) -> tuple[Any, dict[str, float], float | None]:
    """Fit with ``config`` as ``pellucid fit`` would, test the best checkpoint; return (cli, test metrics, seconds).

    With ``checkpoint`` (a ``.ckpt`` trained with ``config``) nothing is trained: that checkpoint is tested.
    """
    name = Path(config).stem
    args = ["--config", str(ROOT / config), f"--trainer.default_root_dir={root / name}",
            "--trainer.enable_progress_bar=false", *extra, *(QUICK if quick else [])]  # --quick wins
    cli = build_cli(args, run=False)
    fit_seconds = None
    if checkpoint is None:
        start = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        fit_seconds = time.perf_counter() - start
        checkpoint = cli.trainer.checkpoint_callback.best_model_path if cli.trainer.checkpoint_callback else ""
    tested = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=checkpoint or None, verbose=False)
    return cli, {k: float(v) for k, v in tested[0].items()}, fit_seconds


def rule_comparison(model: Any) -> dict[str, Any]:
    """The head's malignant-vs-benign weights per unit against LABEL_RULE's points."""
    weights, biases = model.label_head.unit_weights(model.concept_bank)
    names = [spec.name for spec in model.concept_specs]
    benign, malignant = PHANTOM_CLASSES.index("benign"), PHANTOM_CLASSES.index("malignant")
    contrast = {name: float(weights[malignant, m] - weights[benign, m]) for m, name in enumerate(names)}
    bias = float(biases[malignant] - biases[benign])
    expected_sign = {**{k: (v > 0) - (v < 0) for k, v in RULE_POINTS.items()}, "diameter_mm": 1}
    signs = {k: (contrast[k] > 0) - (contrast[k] < 0) == s for k, s in expected_sign.items()}
    per_irregular = {k: contrast[k] / contrast["irregular"] for k in RULE_POINTS} if contrast["irregular"] else {}
    # A lesion worth one point without its size (irregular only) is malignant iff large: where does the head switch?
    mean_contrast = 0.65  # middle of the phantom's lesion contrast range (0.3, 1.0)
    offset = bias + contrast["irregular"] + contrast.get("contrast", 0.0) * mean_contrast
    threshold = -offset / contrast["diameter_mm"] if contrast["diameter_mm"] else float("nan")
    return {"malignant_minus_benign_per_unit": contrast, "bias": bias, "sign_agreement": sum(signs.values()) / 4,
            "signs_match": signs, "binary_weights_per_irregular": per_irregular,
            "rule_binary_points_per_irregular": {k: v / RULE_POINTS["irregular"] for k, v in RULE_POINTS.items()},
            "implied_diameter_threshold_mm": threshold, "rule_diameter_threshold_mm": LABEL_RULE.large_diameter_mm}


@torch.no_grad()
def concept_evaluation(cli: Any, trials: dict[str, int]) -> dict[str, Any]:
    """Concept, leakage, intervention, transparency and localization numbers on the test split."""
    model = cli.model.model.eval()
    batches = list(cli.datamodule.test_dataloader())
    concepts = ConceptMetrics(model.concept_specs)
    leakage = LeakageCheck()
    pointing, energy = PointingGame(), EnergyInsideMask()
    concept_pointing = {spec.name: PointingGame() for spec in model.concept_specs}
    agreement, count, has_concept_maps = 0.0, 0, False
    all_logits, all_truth = [], []
    device = next(model.parameters()).device
    for batch in batches:
        image = batch["image"].to(device)
        output = model(image, explain=True).cpu()
        concepts.update(output.concept_logits, batch["concepts"])
        all_logits.append(output.concept_logits)
        all_truth.append(batch["concepts"])
        soft, hard = soft_and_hard_logits(model, image)
        leakage.update(soft.cpu(), hard.cpu(), batch["label"])
        maps = class_maps(output.localization, batch["label"])
        pointing.update(maps, batch["mask"])
        energy.update(maps, batch["mask"])
        if output.concept_maps is not None:
            has_concept_maps = True
            upsampled = concept_maps_at_input(output.concept_maps, image.shape[2:])
            for m, spec in enumerate(model.concept_specs):
                concept_pointing[spec.name].update(upsampled[:, m], batch["mask"])
        rule_labels = LABEL_RULE.label_from_concepts(batch["concepts"])
        agreed = head_rule_agreement(model, image, batch["concepts"].to(device), rule_labels)
        agreement += float(agreed) * len(rule_labels)
        count += len(rule_labels)
    results: dict[str, Any] = {"concepts": {k: float(v) for k, v in concepts.compute().items()},
                               "leakage": {k: float(v) for k, v in leakage.compute().items()},
                               "localization": {"pointing_game": float(pointing.compute()),
                                                "energy_inside_mask": float(energy.compute())}}
    results["binary_accuracy_on_lesions_by_diameter_mm"] = accuracy_by_diameter(
        model.concept_specs, torch.cat(all_logits), torch.cat(all_truth))
    if has_concept_maps:
        results["concept_map_pointing_game"] = {k: float(v.compute()) for k, v in concept_pointing.items()}
    results["interventions"] = {}
    for policy in POLICIES:
        curve = evaluate_interventions(model, batches, policy, trials=trials[policy], seed=0)
        results["interventions"][policy] = {
            "accuracy": [round(float(a), 4) for a in curve["accuracy"]], "auc": float(curve["auc"]),
            "gain": float(curve["gain"]), "monotonic": bool(curve["monotonic"]), "trials": trials[policy]}
    results["transparency"] = {"head_agrees_with_rule_on_true_concepts": agreement / max(count, 1)}
    if hasattr(model, "describe_head"):
        results["transparency"]["head_table"] = model.describe_head(PHANTOM_CLASSES).splitlines()
        results["transparency"]["rule"] = LABEL_RULE.describe()
        results["transparency"].update(rule_comparison(model))
    return results


def accuracy_by_diameter(specs: list[Any], logits: torch.Tensor, truth: torch.Tensor) -> dict[str, dict[str, float]]:
    """Each binary concept's accuracy on the scans with a lesion, by lesion diameter (small lesions are ambiguous)."""
    diameter = truth[:, [spec.name for spec in specs].index("diameter_mm")]
    results: dict[str, dict[str, float]] = {}
    for column, spec in enumerate(specs):
        if spec.kind != "binary":
            continue
        results[spec.name] = {}
        for low, high in DIAMETER_BINS_MM:
            rows = (diameter >= low) & (diameter < high)
            hits = (logits[rows, column] > 0) == (truth[rows, column] >= 0.5)
            results[spec.name][f"{low:g}-{high:g}"] = float(hits.float().mean()) if bool(rows.any()) else float("nan")
    return results


def machine() -> dict[str, Any]:
    """Where the numbers were measured."""
    return {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


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
        ]
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
            cli, test, seconds = train_and_test(config, arguments.quick, root, arguments.cli_arg, arguments.ckpt)
            report["runs"].append({"config": config, "checkpoint": arguments.ckpt, "model": cli.model.model.name,
                                   "test": test, "fit_seconds": seconds, **concept_evaluation(cli, trials)})
        if not arguments.no_baseline:  # trained for as many epochs, on the same augmentation, as the first config
            budget = same_budget_overrides(ROOT / (arguments.config or [DEFAULT_CONFIG])[0])
            cli, test, seconds = train_and_test(arguments.baseline, arguments.quick, root, budget + arguments.cli_arg)
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
