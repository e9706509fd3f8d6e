"""Peak memory of a 3D ProtoPNet training step on 64^3 volumes, batch 2, on the CPU.

The model is the shipped 3D ProtoPNet (``configs/experiments/protopnet_phantom3d.yaml``: ``model_kwargs`` and
``loss_weights``; MONAI residual convnet [16, 32, 64], strides 2, 10 prototypes per class of 64 channels, mask
guidance) inside ``InterpretableModule``. A training step is what ``InterpretableModule.training_step`` runs
(forward with ``explain=False``, the weighted loss terms) plus backward and an AdamW step; ``--explain`` also
times a step with ``explain=True``. The phantom volumes are 64^3 at 2 mm.

Each measurement runs in a fresh (spawned) process: model, optimizer and batch are built first, then the resident
memory is sampled every 2 ms (Linux ``/proc``) during the first training step (which also allocates the AdamW
state) and during later steps. The headline number, ``step_peak_over_built_mb``, is the peak resident memory
during any step minus the resident memory once model, optimizer and batch exist (the allocator keeps memory of the
first step resident, so later steps add little over their own start; both are reported), with the process's
``ru_maxrss`` high-water mark.

    python benchmarks/memory_3d.py [--quick] [--size 64] [--batch-size 2] [--steps 3] [--explain] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import time
from pathlib import Path
from typing import Any

import torch

from pellucid.training.evaluate import config_settings, machine, phantom_batch, phantom_module, training_step
from pellucid.training.evaluate_measures import PeakResidentMemory, resident_mb

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "configs" / "experiments" / "protopnet_phantom3d.yaml"


def shipped_settings() -> dict[str, Any]:
    """``model`` name, ``model_kwargs`` and ``loss_weights`` of the shipped 3D ProtoPNet experiment."""
    return config_settings(EXPERIMENT, keys=("model", "model_kwargs", "loss_weights"))


def _measure(size: int, batch_size: int, steps: int, explain: bool, threads: int | None) -> dict[str, Any]:
    """Run in a fresh process: resident memory before and at its peak during training steps."""
    if threads:
        torch.set_num_threads(threads)
    start_mb = resident_mb()
    module = phantom_module(spatial_dims=3, seed=0, **shipped_settings())
    batch = phantom_batch(3, batch_size, image_size=size)
    step = training_step(module, batch)  # builds the optimizer
    parameters = sum(p.numel() for p in module.parameters())

    built_mb = resident_mb()
    records = []
    for index in range(steps):
        with PeakResidentMemory() as peak:
            seconds = step(explain)
        records.append({"step": index, "rss_mb_before": round(peak.before_mb, 1), "rss_mb_peak": round(peak.peak_mb, 1),
                        "increase_mb": round(peak.increase_mb, 1), "seconds": round(seconds, 2)})
    return {"explain": explain, "volume": [size] * 3, "batch_size": batch_size, "parameters": parameters,
            "input_mb": round(batch["image"].numel() * 4 / 2**20, 1),
            "rss_mb_at_start": round(start_mb, 1), "rss_mb_after_building": round(built_mb, 1),
            "steps": records, "step_peak_over_built_mb": round(max(r["rss_mb_peak"] for r in records) - built_mb, 1),
            "first_step_increase_mb": records[0]["increase_mb"],
            "steady_step_increase_mb": max(r["increase_mb"] for r in records[1:]) if steps > 1 else None,
            "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "torch_threads": torch.get_num_threads()}


def measure(size: int, batch_size: int, steps: int, explain: bool, threads: int | None) -> dict[str, Any]:
    """:func:`_measure` in a fresh spawned process (so earlier allocations do not hide the peak)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure, (size, batch_size, steps, explain, threads))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 32^3 volumes, 2 steps")
    parser.add_argument("--size", type=int, default=64, help="voxels per axis")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="training steps measured (the first allocates state)")
    parser.add_argument("--explain", action="store_true", help="also measure steps with explain=True")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.size, arguments.steps = 32, 2
    start = time.perf_counter()
    runs = [measure(arguments.size, arguments.batch_size, arguments.steps, False, arguments.threads)]
    if arguments.explain:
        runs.append(measure(arguments.size, arguments.batch_size, arguments.steps, True, arguments.threads))
    report = {"model": shipped_settings(), "config": str(EXPERIMENT.relative_to(ROOT)), "runs": runs,
              "wall_s": round(time.perf_counter() - start, 1), "machine": machine()}
    if not arguments.json:
        print(__doc__)
        for run in runs:
            print(f"explain={run['explain']}: training-step peak +{run['step_peak_over_built_mb']} MB over "
                  f"{run['rss_mb_after_building']} MB (imports, model, optimizer, batch); first step "
                  f"+{run['first_step_increase_mb']} MB, later steps +{run['steady_step_increase_mb']} MB over their "
                  f"own start; ru_maxrss {run['ru_maxrss_mb']} MB")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
