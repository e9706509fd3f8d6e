"""Train one experiment config under several sets of overrides and print each run's headline numbers.

Each variant is fitted through the CLI's own code path (``build_cli``) and measured on the test split by
``pellucid.training.report.write_report`` (the code behind ``pellucid report``; randomisation check skipped, 8
deletion curves). One JSON line per variant: task accuracy, pointing game of the predicted class's evidence,
energy inside the mask, prototype purity, mean binary-concept accuracy, diameter MAE, and the accuracy with every
concept corrected (accuracy + intervention gain), whichever apply. This is how the issue notes' sweeps were run
(on a GPU: add ``--trainer.accelerator=gpu --data.init_args.cache=true`` to the shared overrides).

    python benchmarks/sweep_config.py configs/experiments/cbm_phantom2d.yaml \\
        --variant base= --variant lambda10=--model.loss_weights.concept=10.0 [--shared --trainer.max_epochs=4]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from build_zoo import fit_and_select, flatten_report

from pellucid.training.report import write_report

BINARY_CONCEPTS = ("irregular", "spiculated", "calcified")  # the phantom's binary findings


def headline(metrics: dict[str, float]) -> dict[str, float | None]:
    """The numbers a sweep compares, from :func:`build_zoo.flatten_report` (``None`` where one does not apply)."""
    accuracy, gain = metrics.get("test/accuracy"), metrics.get("actionability/intervention_gain")
    binary = [metrics.get(f"physical_attribution/concept/{name}/accuracy") for name in BINARY_CONCEPTS]
    return {"accuracy": accuracy, "dice": metrics.get("test/dice"),
            "pointing_game": metrics.get("localization/pointing_game"),
            "energy_inside_mask": metrics.get("localization/energy_inside_mask"),
            "prototype_purity": metrics.get("visual_recognizability/prototype_purity"),
            "binary_concept_accuracy": None if None in binary else sum(binary) / len(binary),
            "diameter_mae_mm": metrics.get("physical_attribution/concept_mae/diameter_mm"),
            "accuracy_all_concepts_corrected": None if gain is None or accuracy is None else accuracy + gain}


def run_variant(config: Path, overrides: list[str], root: Path) -> dict[str, Any]:
    """Fit ``config`` with ``overrides``; report on the checkpoint the config selects (best, else last)."""
    start = time.perf_counter()
    cli, checkpoint, _ = fit_and_select(config, root, ["--trainer.logger=false", *overrides])
    paths = write_report(checkpoint, cli.datamodule, root / "report", sanity_samples=0, deletion_samples=8)
    numbers = headline(flatten_report(json.loads(paths.json.read_text(encoding="utf-8"))))
    return {**{k: None if v is None else round(float(v), 4) for k, v in numbers.items()},
            "minutes": round((time.perf_counter() - start) / 60, 2)}


def main(argv: list[str] | None = None) -> None:
    """Parse ``NAME=OVERRIDES`` variants and print one JSON line per variant."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="experiment config")
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=OVERRIDES",
                        help="a name and its CLI overrides (shell-quoted, may be empty); repeat per variant")
    parser.add_argument("--shared", nargs=argparse.REMAINDER, default=[], help="overrides for every variant (last)")
    parser.add_argument("--out", type=Path, default=None, help="folder for runs (default: a temporary folder)")
    args = parser.parse_args(argv)
    variants = []
    for text in args.variant:
        name, separator, overrides = text.partition("=")
        if not separator or not name:
            parser.error(f"--variant expects NAME=OVERRIDES, got {text!r}")
        variants.append((name, shlex.split(overrides)))
    root = args.out or Path(tempfile.mkdtemp(prefix="pellucid-sweep-"))
    for name, overrides in variants:
        result = run_variant(args.config, [*overrides, *args.shared], root / name)
        print(json.dumps({"variant": name, "overrides": overrides, **result}), flush=True)
    print(f"runs under {root}", file=sys.stderr)


if __name__ == "__main__":
    main()
