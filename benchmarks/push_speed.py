"""Push cost: time of one push relative to one forward pass over the same images, and peak memory as the set grows.

1. Ratio: ProtoPNet as shipped (``configs/model/protopnet.yaml``: MONAI convnet [16, 32, 64], 30 prototypes of 64
   channels) on 2D phantoms held in memory; one forward pass (``explain=False``, no gradients) and one push over the
   same batches, repeated, median of the ratios. Target: push <= 1.5x forward.
2. Memory: push over lazily generated phantom sets of N and 10 N images, each in a fresh process; the peak resident
   memory during the push (sampled every 5 ms) minus the resident memory just before it (Linux ``/proc``). Push
   keeps a fixed number of candidates per prototype (its k best, for distinct sources), so this must not grow with N.

The push timed is the default one: a distinct source patch per prototype.

    python benchmarks/push_speed.py [--quick] [--images 1000] [--sizes 400 4000] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from typing import Any

import torch

from pellucid.models import create_model
from pellucid.training.data import PhantomConfig, PhantomDataset, PhantomGenerator
from pellucid.training.evaluate import machine
from pellucid.training.evaluate_measures import (
    InMemory,
    PeakResidentMemory,
    push_loader,
    push_seconds,
    resident_mb,
    time_forward_and_push,
)

MODEL_KWARGS = {"backbone_kwargs": {"channels": [16, 32, 64], "strides": [2, 2, 2]}, "prototypes_per_class": 10,
                "prototype_channels": 64}
BATCH_SIZE = 64


def model(spatial_dims: int = 2) -> torch.nn.Module:
    """The shipped ProtoPNet, in eval mode."""
    torch.manual_seed(0)
    return create_model("protopnet", spatial_dims, in_channels=1, num_classes=3, **MODEL_KWARGS).eval()


def phantoms(count: int, spatial_dims: int = 2) -> PhantomDataset:
    """A lazily generated phantom training split of ``count`` images."""
    return PhantomDataset(PhantomGenerator(PhantomConfig(spatial_dims=spatial_dims), seed=0), "train", count)


def ratio(images: int, repeats: int, spatial_dims: int) -> dict[str, Any]:
    """Median push / forward time over ``repeats`` alternating runs on the same in-memory images."""
    data = phantoms(images, spatial_dims)
    loader = push_loader(InMemory([data[i] for i in range(images)]), BATCH_SIZE)
    forward_times, push_times = time_forward_and_push(model(spatial_dims), loader, repeats)
    ratios = [p / f for p, f in zip(push_times, forward_times, strict=True)]
    return {"images": images, "spatial_dims": spatial_dims, "forward_s": [round(t, 3) for t in forward_times],
            "push_s": [round(t, 3) for t in push_times],
            "push_over_forward_median": round(statistics.median(ratios), 3)}


def _peak_memory_of_push(count: int) -> dict[str, float]:
    """Run in a fresh process: resident memory before and at its peak during one push over ``count`` phantoms."""
    torch.set_num_threads(1)
    network, data = model(), phantoms(count)
    loader = push_loader(data, BATCH_SIZE)
    with torch.no_grad():  # touch every code path once so allocator pools exist before the baseline
        network.push_candidates(next(iter(loader))["image"])
    before = resident_mb()
    with PeakResidentMemory(interval_s=0.005) as sampler:
        seconds = push_seconds(network, loader)
    peak = sampler.peak_mb
    return {"images": count, "rss_mb_before": round(before, 1), "rss_mb_peak_during_push": round(peak, 1),
            "push_increase_mb": round(peak - before, 1), "push_s": round(seconds, 2)}


def memory(sizes: list[int]) -> list[dict[str, float]]:
    """Peak-memory increase of a push for each set size, each measured in its own process."""
    context = multiprocessing.get_context("spawn")
    results = []
    for count in sizes:
        with context.Pool(1) as pool:
            results.append(pool.apply(_peak_memory_of_push, (count,)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 128 images, sizes 64 and 640")
    parser.add_argument("--images", type=int, default=1000, help="images for the time ratio")
    parser.add_argument("--repeats", type=int, default=3, help="forward/push pairs for the time ratio")
    parser.add_argument("--sizes", type=int, nargs="+", default=[400, 4000], help="push set sizes for memory")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.images, arguments.repeats, arguments.sizes = 128, 1, [64, 640]
    start = time.perf_counter()
    report = {"ratio_2d": ratio(arguments.images, arguments.repeats, 2),
              "ratio_3d": ratio(max(16, arguments.images // 8), arguments.repeats, 3),
              "memory_2d": memory(arguments.sizes), "target_push_over_forward": 1.5, "wall_s": 0.0,
              "machine": machine()}
    growth = report["memory_2d"][-1]["push_increase_mb"] - report["memory_2d"][0]["push_increase_mb"]
    report["memory_growth_mb_small_to_large"] = round(growth, 1)
    report["wall_s"] = round(time.perf_counter() - start, 1)
    report["machine"]["load_average_at_end"] = machine()["load_average"]
    if not arguments.json:
        print(__doc__)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
