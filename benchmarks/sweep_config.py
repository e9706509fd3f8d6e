"""Train one experiment config under several sets of overrides and print each run's headline numbers.

Each variant is fitted through the CLI's own code path (``pellucid.training.evaluate.fit_config``) and measured on
the test split by ``evaluate_model`` (the code behind ``pellucid report``; randomisation check skipped, 8 deletion
curves). One JSON line per variant: task accuracy, pointing game of the predicted class's evidence,
energy inside the mask, prototype purity, mean binary-concept accuracy, diameter MAE, and the accuracy with every
concept corrected (accuracy + intervention gain), whichever apply. This is how the issue notes' sweeps were run
(on a GPU: add ``--trainer.accelerator=gpu --data.init_args.cache=true`` to the shared overrides).

    python benchmarks/sweep_config.py configs/experiments/cbm_phantom2d.yaml \\
        --variant base= --variant lambda10=--model.loss_weights.concept=10.0 [--shared --trainer.max_epochs=4]

``--seeds 0 1 2 3`` runs every variant once per seed (``--seed_everything``; the data stay the same) and ends with
one line per variant holding the mean and the spread over its seeds. ``--texture-seeds 7`` measures every run again
on the test split of phantom seed 7 (tissue textures training never saw; the other data settings unchanged); its
numbers carry the suffix ``@7``. ``--jobs N`` runs N fits at a time, each in
its own process (log in ``<out>/<run>.log``; ``OMP_NUM_THREADS`` defaults to the CPU count over N).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pellucid.training.evaluate import evaluate_model, fit_config, seed_summary

BINARY_CONCEPTS = ("irregular", "spiculated", "calcified")  # the phantom's binary findings


def headline(metrics: dict[str, float]) -> dict[str, float | None]:
    """The numbers a sweep compares, from ``evaluate_model(...).metrics`` (``None`` where one does not apply)."""
    accuracy, gain = metrics.get("test/accuracy"), metrics.get("actionability/intervention_gain")
    binary = [metrics.get(f"physical_attribution/concept/{name}/accuracy") for name in BINARY_CONCEPTS]
    return {"accuracy": accuracy, "dice": metrics.get("test/dice"),
            "pointing_game": metrics.get("localization/pointing_game"),
            "concept_map_pointing_game": metrics.get("physical_attribution/concept_map_pointing_game"),
            "energy_inside_mask": metrics.get("localization/energy_inside_mask"),
            "prototype_purity": metrics.get("visual_recognizability/prototype_purity"),
            "binary_concept_accuracy": None if None in binary else sum(binary) / len(binary),
            "diameter_mae_mm": metrics.get("physical_attribution/concept_mae/diameter_mm"),
            "accuracy_all_concepts_corrected": None if gain is None or accuracy is None else accuracy + gain}


def reseeded(datamodule: Any, seed: int) -> Any:
    """A copy of a phantom data module drawn with data seed ``seed`` (every other setting kept)."""
    hparams = {k: v for k, v in dict(getattr(datamodule, "hparams", {})).items() if not k.startswith("_")}
    if "seed" not in hparams:
        raise ValueError(f"--texture-seeds: the data module {type(datamodule).__name__} has no 'seed' setting; "
                         "use it with the phantom benchmark's PhantomDataModule")
    return type(datamodule)(**{**hparams, "seed": seed})


def run_variant(config: Path, overrides: list[str], root: Path, texture_seeds: list[int] = ()) -> dict[str, Any]:
    """Fit ``config`` with ``overrides``; report on the checkpoint the config selects (best, else last).

    Each of ``texture_seeds`` adds the same numbers measured on that phantom seed's test split (keys ``name@seed``).
    """
    start = time.perf_counter()
    fit = fit_config(config, ["--trainer.logger=false", *overrides], root=root)
    numbers = headline(evaluate_model(fit, fit.datamodule, root / "report", sanity_samples=0,
                                      deletion_samples=8).metrics)
    for seed in texture_seeds:
        unseen = headline(evaluate_model(fit, reseeded(fit.datamodule, seed), root / f"report_seed{seed}",
                                         sanity_samples=0, deletion_samples=8).metrics)
        numbers.update({f"{name}@{seed}": value for name, value in unseen.items() if value is not None})
    return {**{k: None if v is None else round(float(v), 4) for k, v in numbers.items()},
            "minutes": round((time.perf_counter() - start) / 60, 2)}


def expand_seeds(variants: list[tuple[str, list[str]]], seeds: list[int]) -> list[tuple[str, list[str]]]:
    """One run per variant and seed, named ``<variant>_s<seed>``; the variants unchanged when ``seeds`` is empty."""
    if not seeds:
        return variants
    return [(f"{name}_s{seed}", [*overrides, f"--seed_everything={seed}"]) for name, overrides in variants
            for seed in seeds]


def variant_summaries(results: list[dict[str, Any]], names: list[str], seeds: list[int]) -> list[dict[str, Any]]:
    """Per variant: mean, population standard deviation, minimum and maximum of each number over its seeds' runs.

    Numbers missing from a run (``None``) are left out of that number's statistics; a seed whose run is missing
    is listed under ``missing``.
    """
    by_run = {result["variant"]: result for result in results}
    summaries = []
    for name in names:
        present = [seed for seed in seeds if f"{name}_s{seed}" in by_run]
        runs = [by_run[f"{name}_s{seed}"] for seed in present]
        summary: dict[str, Any] = {"variant": name, "seeds": present,
                                   "missing": [seed for seed in seeds if seed not in present]}
        for key in runs[0] if runs else []:
            values = [run[key] for run in runs if isinstance(run.get(key), (int, float))]
            if key in ("variant", "overrides", "minutes") or not values:
                continue
            summary[key] = seed_summary(values)
        summaries.append(summary)
    return summaries


def _run_in_process(config: Path, name: str, overrides: list[str], shared: list[str], root: Path,
                    threads: int, texture_seeds: list[int]) -> dict[str, Any]:
    """Fit one run in a fresh interpreter (this script with a single variant); its JSON line, parsed."""
    root.mkdir(parents=True, exist_ok=True)
    seeds = ["--texture-seeds", *map(str, texture_seeds)] if texture_seeds else []
    command = [sys.executable, str(Path(__file__).resolve()), str(config), "--variant",
               f"{name}={shlex.join(overrides)}", "--out", str(root), *seeds, "--shared", *shared]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    log = root / f"{name}.log"
    with log.open("w", encoding="utf-8") as stderr:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"run {name!r} failed with exit code {done.returncode}; its log: {log}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> None:
    """Parse ``NAME=OVERRIDES`` variants and print one JSON line per variant."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="experiment config")
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=OVERRIDES",
                        help="a name and its CLI overrides (shell-quoted, may be empty); repeat per variant")
    parser.add_argument("--shared", nargs=argparse.REMAINDER, default=[], help="overrides for every variant (last)")
    parser.add_argument("--out", type=Path, default=None, help="folder for runs (default: a temporary folder)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[], help="run every variant once per seed")
    parser.add_argument("--jobs", type=int, default=1, help="fits at a time, each in its own process")
    parser.add_argument("--texture-seeds", type=int, nargs="+", default=[],
                        help="also measure every run on the test split of these phantom seeds (unseen textures)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    variants = []
    for text in args.variant:
        name, separator, overrides = text.partition("=")
        if not separator or not name:
            parser.error(f"--variant expects NAME=OVERRIDES, got {text!r}")
        variants.append((name, shlex.split(overrides)))
    names = [name for name, _ in variants]
    if len(set(names)) != len(names):
        parser.error(f"variant names must differ, got {names}")
    runs = expand_seeds(variants, args.seeds)
    root = args.out or Path(tempfile.mkdtemp(prefix="pellucid-sweep-"))
    results: list[dict[str, Any]] = []
    failures: list[str] = []
    if args.jobs == 1:
        for name, overrides in runs:
            result = {"variant": name, "overrides": overrides,
                      **run_variant(args.config, [*overrides, *args.shared], root / name, args.texture_seeds)}
            results.append(result)
            print(json.dumps(result), flush=True)
    else:
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(_run_in_process, args.config, name, overrides, args.shared, root, threads,
                                   args.texture_seeds)
                       for name, overrides in runs]
            for future in futures:
                try:
                    result = future.result()
                except RuntimeError as error:  # the other runs go on; the sweep still fails at the end
                    failures.append(str(error))
                    print(error, file=sys.stderr, flush=True)
                    continue
                results.append(result)
                print(json.dumps(result), flush=True)
    if args.seeds:
        for summary in variant_summaries(results, names, args.seeds):
            print(json.dumps(summary), flush=True)
    print(f"runs under {root}", file=sys.stderr)
    if failures:
        sys.exit(f"{len(failures)} of {len(runs)} runs failed: " + "; ".join(failures))


if __name__ == "__main__":
    main()
