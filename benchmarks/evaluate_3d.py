"""The 3D bundles on the 3D phantom's test split and on phantoms whose tissue textures training never saw (issue 17).

Each bundle is measured by the report card's code (``evaluate_model``, the code behind ``pellucid report``) on the
test split of its own experiment config's data (``configs/experiments/<bundle>.yaml``: 300 volumes of 32³ at 2 mm)
drawn with each ``--texture-seeds`` seed; seed 0 is the training data's phantom, any other seed draws unseen tissue
textures, bodies, lesions and noise. Prints one JSON object (per bundle and seed: accuracy, balanced accuracy, lesion
Dice, the pointing game and energy inside the mask of the user-facing ``localization``) and, with ``--markdown``, a
table for the README.

    python benchmarks/evaluate_3d.py --texture-seeds 0 7
    python benchmarks/evaluate_3d.py --bundles blackbox_phantom3d attention_unet_phantom3d --texture-seeds 7
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from pellucid.training.evaluate import evaluate_model, machine, read_metadata, resolve_bundle

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "configs" / "experiments"
NUMBERS = {"accuracy": "test/accuracy", "balanced_accuracy": "test/balanced_accuracy", "dice": "test/dice",
           "pointing_game": "localization/pointing_game", "energy_inside_mask": "localization/energy_inside_mask"}


def shipped_3d_bundles() -> list[str]:
    """Names of the shipped bundles trained on 3D data that have their experiment config."""
    names = []
    for folder in sorted((ROOT / "checkpoints").iterdir()):
        if (folder / "metadata.json").is_file() and (EXPERIMENTS / f"{folder.name}.yaml").is_file():
            if read_metadata(folder).get("spatial_dims") == 3:
                names.append(folder.name)
    return names


def measure(bundle: str, texture_seed: int, out: Path) -> dict[str, float | None]:
    """Headline numbers of ``bundle`` on its config's test split drawn with phantom seed ``texture_seed``."""
    config = EXPERIMENTS / f"{bundle}.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"evaluate_3d.py: bundle {bundle!r} has no experiment config {config}; pass a "
                                "bundle trained by a committed config")
    metrics = evaluate_model(bundle, config, out / bundle / f"seed{texture_seed}", sanity_samples=0,
                             posthoc_samples=0, deletion_samples=8, data_overrides={"seed": texture_seed}).metrics
    return {name: None if metrics.get(key) is None else float(f"{metrics[key]:.4g}") for name, key in NUMBERS.items()}


def markdown(result: dict[str, dict[str, dict[str, float | None]]], seeds: list[int]) -> str:
    """One row per bundle: each number as ``seed a / seed b``."""
    def cell(bundle: str, name: str) -> str:
        values = [result[bundle][str(s)][name] for s in seeds]
        return "–" if all(v is None for v in values) else " / ".join("–" if v is None else f"{v:.3f}" for v in values)

    lines = ["| bundle | " + " | ".join(NUMBERS) + " |", "|---" * (len(NUMBERS) + 1) + "|"]
    lines += [f"| `{bundle}` | " + " | ".join(cell(bundle, name) for name in NUMBERS) + " |" for bundle in result]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure and print the JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundles", nargs="+", help="bundle names (default: every shipped 3D bundle)")
    parser.add_argument("--texture-seeds", type=int, nargs="+", default=[0, 7], help="phantom seeds tested on")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs/evaluate_3d")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--markdown", action="store_true", help="also print a markdown table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    bundles = args.bundles or shipped_3d_bundles()
    for bundle in bundles:
        resolve_bundle(bundle)  # an unknown name fails here, before any evaluation
    start = time.perf_counter()
    measured = {bundle: {str(seed): measure(bundle, seed, args.out) for seed in args.texture_seeds}
                for bundle in bundles}
    result = {"bundles": measured, "texture_seeds": args.texture_seeds,
              "minutes": round((time.perf_counter() - start) / 60, 1), "machine": machine()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.markdown:
        print(markdown(measured, args.texture_seeds))
    if args.json:
        args.json.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
