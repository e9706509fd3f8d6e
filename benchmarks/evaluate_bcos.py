"""B-cos against the black box: accuracy, pointing game, exact contributions, over training seeds and phantom textures.

Fits ``configs/experiments/bcos_phantom2d.yaml`` (``--config``) once per ``--seeds`` entry (``--seed_everything``;
the data keep their seed) through the CLI's code path (``pellucid.training.evaluate.fit_config``, the checkpoint the
config selects), and, with ``--baseline-seeds``, the black box (``--baseline-config``, ``blackbox_phantom2d.yaml``)
given the same epochs and augmentation. Every model, and the bundles named by ``--bundles``, is measured by the
report card's code (``evaluate_model``; randomisation check skipped, 8 deletion curves) on the test split of the
``--config``'s phantom drawn with each seed in ``--texture-seeds``: seed 0 is the training data's generator, any
other seed draws unseen tissue textures, lesions and noise. One JSON object: per model and phantom seed the accuracy,
the pointing game and energy inside the mask of the predicted class's evidence, and the contributions' largest
relative logit error; then, per family, the mean and spread over its runs (fitted seeds and bundles; the zoo trains
a bundle with the config's seed 0) and the largest contribution error.

    python benchmarks/evaluate_bcos.py --seeds 1 2 --texture-seeds 0 7 --bundles bcos_phantom2d blackbox_phantom2d
    python benchmarks/evaluate_bcos.py --seeds --bundles bcos_phantom2d blackbox_phantom2d   # bundles only
    python benchmarks/evaluate_bcos.py --quick --seeds 0   # smoke run: one epoch on 256 phantoms
    python benchmarks/evaluate_bcos.py --config configs/experiments/bcos_phantom3d.yaml \
        --baseline-config configs/experiments/blackbox_phantom3d.yaml --seeds 0 --baseline-seeds 0 --texture-seeds 0
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from pellucid.training.evaluate import (
    evaluate_model,
    fit_config,
    machine,
    read_metadata,
    resolve_bundle,
    same_budget_overrides,
    seed_summary,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/experiments/bcos_phantom2d.yaml"
BASELINE = ROOT / "configs/experiments/blackbox_phantom2d.yaml"
QUICK = ["--trainer.max_epochs=1", "--data.init_args.num_train=256", "--data.init_args.num_val=64"]
NUMBERS = {"accuracy": "test/accuracy", "pointing_game": "localization/pointing_game",
           "energy_inside_mask": "localization/energy_inside_mask",
           "contribution_reconstruction_error": "transparency/contribution_reconstruction_error"}


def measure(source: Any, data: Path, texture_seed: int, out: Path, test_samples: int | None
            ) -> dict[str, float | None]:
    """Headline numbers of ``source`` (a fit, checkpoint or bundle) on the test split of ``data``'s phantom drawn
    with seed ``texture_seed``."""
    overrides: dict[str, Any] = {"seed": texture_seed}
    if test_samples is not None:
        overrides["num_test"] = test_samples
    metrics = evaluate_model(source, data, out, sanity_samples=0, deletion_samples=8, data_overrides=overrides).metrics
    return {name: None if metrics.get(key) is None else float(f"{metrics[key]:.4g}") for name, key in NUMBERS.items()}


def summary(runs: dict[str, dict[str, dict[str, float | None]]], texture_seeds: list[int]) -> dict[str, Any]:
    """Mean and spread over runs of each number, per phantom seed."""
    result: dict[str, Any] = {}
    for texture in texture_seeds:
        numbers: dict[str, Any] = {}
        for name in NUMBERS:
            values = [run[str(texture)][name] for run in runs.values() if run[str(texture)][name] is not None]
            if values:
                numbers[name] = seed_summary(values) if name != "contribution_reconstruction_error" else max(values)
        result[str(texture)] = numbers
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Fit, measure and print the JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=CONFIG, help="the B-cos experiment config (its data are tested)")
    parser.add_argument("--baseline-config", type=Path, default=BASELINE, help="the black box's experiment config")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="training seeds of the B-cos config")
    parser.add_argument("--baseline-seeds", type=int, nargs="*", default=[], help="training seeds of the black box")
    parser.add_argument("--texture-seeds", type=int, nargs="+", default=[0, 7], help="phantom seeds tested on")
    parser.add_argument("--bundles", nargs="*", default=[], help="zoo bundles measured the same way")
    parser.add_argument("--quick", action="store_true", help="smoke run: one epoch, 256 training phantoms, 64 test")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs/evaluate_bcos")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a busy box)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    extra = ["--trainer.logger=false", *(QUICK if args.quick else [])]
    test_samples = 64 if args.quick else None
    start = time.perf_counter()
    fits = [("bcos", seed, args.config, []) for seed in args.seeds]
    fits += [("blackbox", seed, args.baseline_config, same_budget_overrides(args.config))
             for seed in args.baseline_seeds]
    models: dict[str, dict[str, Any]] = {}
    for family, seed, config, overrides in fits:
        run = f"{family}_s{seed}"
        fit = fit_config(config, [*overrides, *extra], seed=seed, root=args.out / run)
        models[run] = {"family": family, "fit_minutes": round(fit.fit_seconds / 60, 2), **{
            str(texture): measure(fit, args.config, texture, args.out / run / f"report_texture{texture}", test_samples)
            for texture in args.texture_seeds}}
    for bundle in args.bundles:  # a bundle counts as one more run of its family (the zoo builds it with seed 0)
        family = read_metadata(resolve_bundle(bundle))["model"]["name"]
        models[bundle] = {"family": family, "bundle": True, **{
            str(texture): measure(bundle, args.config, texture, args.out / bundle / f"report_texture{texture}",
                                  test_samples)
            for texture in args.texture_seeds}}
    by_family = {family: summary({k: v for k, v in models.items() if v["family"] == family}, args.texture_seeds)
                 for family in ("bcos", "blackbox") if any(v["family"] == family for v in models.values())}
    result = {"models": models, "over_seeds": by_family, "texture_seeds": args.texture_seeds, "quick": args.quick,
              "minutes": round((time.perf_counter() - start) / 60, 1), "machine": machine()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
