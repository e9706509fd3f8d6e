"""PIP-Net's targets on the 2D phantom (issue 18): accuracy, pointing game, prototypes per decision, abstention.

Measures a PIP-Net checkpoint or bundle with the report card's code (``evaluate_model``, the code behind ``pellucid
report``) on the phantom test split of each ``--data-seeds`` seed (seed 0 is the training data's phantom; another seed
draws other tissue textures, lesions and bodies: unseen textures), and counts how often the model abstains on images
that hold none of the parts it learned:

- ``blank``: all zeros, a constant level in [0, 1.2], or the phantom's background noise alone (N(0, 0.04));
- ``marker_only``: the phantom's shortcut marker (a bright "L" in a corner, intensity 1.2) on background noise.

    python benchmarks/evaluate_pipnet.py --ckpt pipnet_phantom2d --data-seeds 0 1
    python benchmarks/evaluate_pipnet.py --ckpt outputs/pipnet_phantom2d/checkpoints/last.ckpt

Prints one JSON object: per data seed the accuracy, the predicted class's pointing game, prototypes per decision
(``head_terms_per_decision``) and the share of test scans abstained on; and the shares of blank and marker-only images
abstained on. ``--fit <config>`` trains the config first (``--seeds`` for several training seeds, each reported).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pellucid.training.data import PhantomConfig, PhantomDataModule, PhantomGenerator
from pellucid.training.evaluate import evaluate_model, fit_config, load_module, seed_summary

HEADLINE = {"accuracy": "test/accuracy", "pointing_game": "localization/pointing_game",
            "prototypes_per_decision": "transparency/head_terms_per_decision",
            "abstained_on_test_scans": "actionability/abstention_share"}


def unfamiliar_images(count: int = 100, image_size: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """Images without any part of a phantom scan: ``blank`` and ``marker_only``, ``count`` of each (2D).

    ``blank``: a fifth all zeros, two fifths a constant level drawn in [0, 1.2], two fifths background noise
    N(0, 0.04); ``marker_only``: the phantom's shortcut marker at intensity 1.2 on background noise.
    """
    generator = torch.Generator().manual_seed(seed)
    size = (1, image_size, image_size)
    zeros = count // 5
    constants = (count - zeros) // 2
    levels = 1.2 * torch.rand(constants, 1, 1, 1, generator=generator)
    blank = torch.cat([torch.zeros(zeros, *size), levels.expand(-1, *size),
                       0.04 * torch.randn(count - zeros - constants, *size, generator=generator)])
    phantom = PhantomGenerator(PhantomConfig(spatial_dims=2, image_size=(image_size, image_size),
                                             shortcut={"test": 1.0}), seed=seed)
    marker = next(torch.from_numpy(s.confounder_mask) for s in (phantom.sample("test", i) for i in range(100))
                  if s.shortcut_present)
    marker_only = 1.2 * marker.expand(count, *size) + 0.04 * torch.randn(count, *size, generator=generator)
    return {"blank": blank, "marker_only": marker_only}


@torch.no_grad()
def abstention_shares(model: Any, images: dict[str, torch.Tensor], batch_size: int = 50) -> dict[str, float]:
    """Share of each named set of images the model abstains on (its ``abstentions`` through the protocol)."""
    model.eval()
    shares = {}
    for name, stack in images.items():
        flags = [model.abstentions(model(part, explain=False)) for part in stack.split(batch_size)]
        if any(flag is None for flag in flags):
            raise ValueError(f"{model.name} never abstains (abstentions() is None): not a PIP-Net")
        shares[name] = float(torch.cat(flags).float().mean())
    return shares


def measure(source: str, data_seeds: list[int], num_test: int, out: Path) -> dict[str, Any]:
    """The headline numbers of one checkpoint or bundle on every data seed, and its abstention on unfamiliar images."""
    model = load_module(source).model  # a .ckpt file or a bundle, as evaluate_model reads it
    result: dict[str, Any] = {"checkpoint": source, "unfamiliar": abstention_shares(model, unfamiliar_images())}
    for seed in data_seeds:
        # the training split as the model saw it (seed 0): the report draws the prototypes' source patches from it
        data = PhantomDataModule(spatial_dims=2, seed=seed, num_train=4000, num_val=16, num_test=num_test,
                                 batch_size=100)
        metrics = evaluate_model(source, data, out / f"data_seed_{seed}", sanity_samples=0,
                                 deletion_samples=16).metrics
        result[f"data_seed_{seed}"] = {name: metrics.get(key) for name, key in HEADLINE.items()}
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure (and optionally first train) and print the JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="a .ckpt file or a bundle name/folder")
    source.add_argument("--fit", type=Path, help="train this experiment config first (its last weights are measured)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (with --fit)")
    parser.add_argument("--data-seeds", type=int, nargs="+", default=[0], help="phantom seeds of the test data")
    parser.add_argument("--num-test", type=int, default=1000, help="test scans per data seed")
    parser.add_argument("--out", type=Path, default=None, help="folder for reports and fits (default: a temp dir)")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="evaluate_pipnet-"))
    runs = []
    if args.ckpt:
        runs.append(measure(args.ckpt, args.data_seeds, args.num_test, out / "model"))
    else:
        for seed in args.seeds:
            fit = fit_config(args.fit, ["--trainer.logger=false"], seed=seed, root=out / f"seed_{seed}", select="last")
            runs.append({"seed": seed, "fit_minutes": round(fit.fit_seconds / 60, 2),
                         **measure(str(fit.checkpoint), args.data_seeds, args.num_test, out / f"seed_{seed}")})
    summary: dict[str, Any] = {"runs": runs}
    if len(runs) > 1:
        for seed in args.data_seeds:
            for name in HEADLINE:
                values = [r[f"data_seed_{seed}"][name] for r in runs if r[f"data_seed_{seed}"][name] is not None]
                if values:
                    summary[f"data_seed_{seed}/{name}"] = seed_summary(values)
        for name in ("blank", "marker_only"):
            summary[f"unfamiliar/{name}"] = seed_summary([r["unfamiliar"][name] for r in runs])
    print(json.dumps(summary, indent=1, default=lambda v: float(v) if isinstance(v, np.floating) else str(v)))
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
