"""Phantom generation speed on ONE core: samples/s for 2D 64x64 and 3D 32^3, including conversion to tensors.

Targets: >= 2,000 2D samples/s and >= 200 3D samples/s.

    python benchmarks/phantom_speed.py [--num-2d 4000] [--num-3d 600] [--json]
"""

from __future__ import annotations

import os

# Thread limits must be set before numpy and torch are imported.
for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from pellucid.training.data import PhantomConfig, PhantomDataset, PhantomGenerator  # noqa: E402
from pellucid.training.evaluate import machine  # noqa: E402

TARGETS = {2: 2000.0, 3: 200.0}


def pin_to_one_core() -> str:
    """Pin this process to one CPU where the OS allows it; return a description."""
    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity"):
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        return f"pinned to core {core}"
    return "not pinned (no sched_setaffinity); threads limited to 1"


def measure(spatial_dims: int, count: int, warmup: int = 50) -> float:
    """Samples per second reading ``count`` items of a fresh train split (default config, shortcut on)."""
    config = PhantomConfig(spatial_dims=spatial_dims, shortcut={"train": 0.9})
    dataset = PhantomDataset(PhantomGenerator(config, seed=0), "train", count + warmup)
    for index in range(count, count + warmup):
        dataset[index]
    start = time.perf_counter()
    for index in range(count):
        dataset[index]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-2d", type=int, default=4000, help="2D samples to time")
    parser.add_argument("--num-3d", type=int, default=600, help="3D samples to time")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    arguments = parser.parse_args()
    pinning = pin_to_one_core()
    rates = {2: measure(2, arguments.num_2d), 3: measure(3, arguments.num_3d)}
    host = machine()
    report = {
        "samples_per_s_2d_64x64": round(rates[2], 1),
        "samples_per_s_3d_32cubed": round(rates[3], 1),
        "targets": {"2d": TARGETS[2], "3d": TARGETS[3]},
        "meets_targets": all(rates[d] >= TARGETS[d] for d in (2, 3)),
        "processor": host["processor"],
        "cpu_count": host["cpu_count"],
        "pinning": pinning,
        "python": host["python"],
        "torch_threads": host["torch_threads"],
    }
    if arguments.json:
        print(json.dumps(report))
        return
    for dims, size in ((2, "64x64"), (3, "32^3")):
        status = "ok" if rates[dims] >= TARGETS[dims] else "BELOW TARGET"
        print(f"{dims}D {size}: {rates[dims]:8.1f} samples/s (target {TARGETS[dims]:g}) {status}")
    print(f"machine: {report['processor']}, {report['cpu_count']} CPUs, {pinning}, python {report['python']}")


if __name__ == "__main__":
    main()
