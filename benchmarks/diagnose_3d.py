"""Why do 3D models fail on the phantom? Geometry of the volumes, and what a 3D black box needs to learn the rule.

Three parts, each answering with numbers (issue 17, item 1):

``geometry`` (no training; seconds): for each phantom setting in ``--settings`` (``<dims>d:<size>@<spacing mm>``,
e.g. ``3d:32@2``) over the test split's scans with a lesion: the lesion's size in voxels and in feature cells at
each ``--strides`` entry (the d-th root of the mask's voxel count, i.e. the equivalent square's or cube's edge), the
voxels a finding changes (counterfactual twins of :mod:`pellucid.training.data.phantom_twins`: removing spiculation,
calcification, irregularity, or crossing the 10 mm diameter threshold; the voxels whose intensity moves by more than
the noise's standard deviation, and that count as a share of the lesion), the pointing game an ideal cell map can
reach once upsampled (:func:`pellucid.training.evaluate_measures.upsampling_ceiling`), the class shares and the
intensity inside the body.

``learning`` (fits; minutes each): the 3D black box config (``--config``) fitted with each override set in
``--runs`` (``name=--key=value;--key=value``), measured on the test split of its own phantom and of a phantom whose
tissue textures training never saw (``--texture-seeds``) by the report card's code: accuracy, balanced accuracy, the
pointing game of Grad-CAM, the fit's minutes.

``by-diameter``: accuracy of bundles or checkpoints on the default phantom's test scans, without lesion and per
diameter bin of the index lesion (4-7, 7-10, 10-13, 13-20 mm).

    python benchmarks/diagnose_3d.py by-diameter --models blackbox_phantom3d
    python benchmarks/diagnose_3d.py geometry --settings 2d:64@1 3d:32@2 3d:48@1.333 3d:64@1 --strides 4 8
    python benchmarks/diagnose_3d.py learning --runs base= more_data=--data.init_args.num_train=4000 \
        longer=--trainer.max_epochs=32
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pellucid.training.data import PhantomConfig, PhantomGenerator
from pellucid.training.evaluate import evaluate_model, fit_config, load_module, machine
from pellucid.training.evaluate_measures import upsampling_ceiling

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/experiments/blackbox_phantom3d.yaml"
FINDINGS = ("no_spiculation", "no_calcification", "no_irregularity", "cross_diameter")
NUMBERS = {"accuracy": "test/accuracy", "balanced_accuracy": "test/balanced_accuracy",
           "pointing_game": "localization/pointing_game"}


def parse_setting(text: str) -> PhantomConfig:
    """``3d:32@2`` -> a 3D phantom of 32 voxels per axis at 2 mm."""
    try:
        dims, rest = text.lower().split("d:")
        size, spacing = rest.split("@")
        return PhantomConfig(spatial_dims=int(dims), image_size=int(size), spacing_mm=float(spacing))
    except ValueError as error:
        raise SystemExit(f"diagnose_3d.py: error: --settings {text!r}: expected <dims>d:<size>@<spacing mm> "
                         f"such as 3d:32@2 ({error})") from None


def quantiles(values: list[float]) -> dict[str, float]:
    """Median and the 10th / 90th percentiles, 3 significant digits."""
    if not values:
        return {}
    low, median, high = np.percentile(values, [10, 50, 90])
    return {"p10": float(f"{low:.3g}"), "median": float(f"{median:.3g}"), "p90": float(f"{high:.3g}")}


def geometry(config: PhantomConfig, samples: int, strides: list[int], seed: int) -> dict[str, Any]:
    """Lesion size in voxels and cells, voxels each finding changes, upsampling ceiling and class shares."""
    generator = PhantomGenerator(config, seed=seed)
    dims = config.spatial_dims
    edges, changed, changed_share, masks, labels = [], {f: [] for f in FINDINGS}, {f: [] for f in FINDINGS}, [], []
    intensities = []
    for index in range(samples):
        sample = generator.sample("test", index)
        labels.append(sample.label)
        intensities.append(sample.image[sample.body_mask])
        lesion = int(sample.mask.sum())
        if lesion == 0:
            continue
        masks.append(torch.from_numpy(sample.mask))
        edges.append(lesion ** (1 / dims))
        for finding in FINDINGS:
            twin = generator.twin("test", index, finding)
            if not twin.applicable:
                continue
            moved = int((np.abs(twin.twin.image - sample.image) > config.noise_std).sum())
            changed[finding].append(moved)
            changed_share[finding].append(moved / lesion)
    stacked = torch.stack(masks)
    return {
        "image_size": list(config.image_size), "spacing_mm": list(config.spacing_mm),
        "scans_with_lesion": len(masks), "scans": samples,
        "class_shares": [round(float(np.mean(np.asarray(labels) == k)), 3) for k in range(3)],
        "body_intensity": {"mean": round(float(np.concatenate(intensities).mean()), 3),
                           "std": round(float(np.concatenate(intensities).std()), 3)},
        "lesion_edge_voxels": quantiles(edges),
        "lesion_edge_cells": {str(s): quantiles([e / s for e in edges]) for s in strides},
        "voxels_a_finding_changes": {f: quantiles([float(v) for v in changed[f]]) for f in FINDINGS},
        "finding_change_share_of_lesion": {f: quantiles(changed_share[f]) for f in FINDINGS},
        "findings_changing_under_8_voxels": {f: round(float(np.mean(np.asarray(changed[f]) < 8)), 3)
                                             for f in FINDINGS if changed[f]},
        "upsampling_ceiling": {str(s): upsampling_ceiling(stacked, s) for s in strides
                               if all(n % s == 0 for n in config.image_size)},
    }


def learning(config: Path, runs: list[str], texture_seeds: list[int], out: Path) -> dict[str, Any]:
    """Fit the config once per override set and measure it on each phantom seed."""
    result: dict[str, Any] = {}
    for run in runs:
        name, _, overrides = run.partition("=")
        fit = fit_config(config, ["--trainer.logger=false", *[o for o in overrides.split(";") if o]], seed=0,
                         root=out / name)
        measured: dict[str, Any] = {"overrides": overrides, "fit_minutes": round(fit.fit_seconds / 60, 2)}
        for texture in texture_seeds:
            metrics = evaluate_model(fit, config, out / name / f"report_texture{texture}", sanity_samples=0,
                                     deletion_samples=4,
                                     data_overrides={"seed": texture, **data_overrides(overrides)}).metrics
            measured[str(texture)] = {k: None if metrics.get(v) is None else float(f"{metrics[v]:.4g}")
                                      for k, v in NUMBERS.items()}
        result[name] = measured
        print(json.dumps({name: measured}), flush=True)
    return result


DIAMETER_BINS_MM = ((4, 7), (7, 10), (10, 13), (13, 20))


@torch.no_grad()
def by_diameter(source: str, spatial_dims: int, samples: int, seed: int) -> dict[str, Any]:
    """Accuracy of a bundle or checkpoint on the first ``samples`` test scans of the default phantom, overall, without
    lesion, and per index-lesion diameter bin (mm)."""
    model = load_module(source).model.eval()
    generator = PhantomGenerator(PhantomConfig(spatial_dims=spatial_dims), seed=seed)
    scans = [generator.sample("test", index) for index in range(samples)]
    images = torch.from_numpy(np.stack([scan.image for scan in scans]))
    predicted = torch.cat([model(part, explain=False).logits.argmax(1) for part in images.split(50)]).numpy()
    right = predicted == np.array([scan.label for scan in scans])
    diameter = np.array([scan.concepts[0] for scan in scans])
    bins = {"all": right, "no_lesion": right[diameter == 0]}
    bins |= {f"{low}-{high}mm": right[(diameter >= low) & (diameter < high)] for low, high in DIAMETER_BINS_MM}
    return {name: {"accuracy": round(float(values.mean()), 3), "n": int(values.size)} for name, values in bins.items()}


def data_overrides(overrides: str) -> dict[str, Any]:
    """The phantom's shape settings among the overrides, so the test phantom is drawn like the training one."""
    shape: dict[str, Any] = {}
    for item in (o for o in overrides.split(";") if o.startswith("--data.init_args.")):
        key, _, value = item.removeprefix("--data.init_args.").partition("=")
        if key in ("image_size", "spacing_mm", "diameter_range_mm"):
            shape[key] = json.loads(value)
    return shape


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the chosen part and print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parts = parser.add_subparsers(dest="part", required=True)
    geo = parts.add_parser("geometry", help="lesion sizes, finding visibility, upsampling ceiling (no training)")
    geo.add_argument("--settings", nargs="+", default=["2d:64@1", "3d:32@2"])
    geo.add_argument("--strides", type=int, nargs="+", default=[4, 8])
    geo.add_argument("--samples", type=int, default=200, help="test scans per setting")
    geo.add_argument("--seed", type=int, default=0)
    fit = parts.add_parser("learning", help="fit the 3D black box under override sets")
    fit.add_argument("--config", type=Path, default=CONFIG)
    fit.add_argument("--runs", nargs="+", default=["base="])
    fit.add_argument("--texture-seeds", type=int, nargs="+", default=[0, 7])
    fit.add_argument("--out", type=Path, default=ROOT / "outputs/diagnose_3d")
    diam = parts.add_parser("by-diameter", help="accuracy per lesion-diameter bin of bundles or checkpoints")
    diam.add_argument("--models", nargs="+", required=True, help="bundle names or .ckpt files")
    diam.add_argument("--spatial-dims", type=int, choices=(2, 3), default=3)
    diam.add_argument("--samples", type=int, default=600, help="test scans")
    diam.add_argument("--seed", type=int, default=0, help="phantom seed")
    for part in (geo, fit, diam):
        part.add_argument("--threads", type=int, default=1)
        part.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.part == "geometry":
        body = {s: geometry(parse_setting(s), args.samples, args.strides, args.seed) for s in args.settings}
    elif args.part == "by-diameter":
        body = {m: by_diameter(m, args.spatial_dims, args.samples, args.seed) for m in args.models}
    else:
        body = learning(args.config, args.runs, args.texture_seeds, args.out)
    result = {args.part: body, "minutes": round((time.perf_counter() - start) / 60, 1), "machine": machine()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
