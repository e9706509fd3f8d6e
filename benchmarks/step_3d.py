"""Training-step time and peak memory of every registered 3D classification family against MONAI's 3D ResNet-10.

A step is forward + loss + backward + optimizer step on one phantom batch (64^3 volumes, batch 2 by default):
for a family, what ``InterpretableModule.training_step`` computes (forward with ``explain=False``, the family's
weighted loss terms) plus backward and the module's own optimizer; for the reference, MONAI's plain
``resnet10(spatial_dims=3, n_input_channels=1, num_classes=3)``, cross-entropy and AdamW. Each family is built by
``create_model`` (through ``InterpretableModule``) with the ``model_kwargs`` and ``loss_weights`` of
``configs/experiments/<family>_phantom3d.yaml`` where that file exists, else with its registry defaults in 3D.
Families whose output has no ``logits`` (segmenters) are left out.

Time: one process, torch threads fixed (1 by default). Each family and the reference take one warm-up step (it
allocates the optimizer state), then ``--repeats`` interleaved steps (family, reference, family, reference ...);
the ratio is the family's median over the reference's median measured in the same pairs, on both clocks: wall time
and the timing thread's CPU time (``time.thread_time``; with one thread it is far less disturbed by other processes
on a shared machine, so ratios are read from it).

Peak memory: each model runs in its own fresh (spawned) process, started with glibc's ``MALLOC_MMAP_THRESHOLD_``
fixed at 128 KiB (a fixed threshold turns off glibc's growing one, so every tensor's memory is mapped on allocation
and returned on release, and resident memory follows live tensors instead of keeping an earlier step's freed heap).
The batch is made, the model and optimizer built, one warm-up step run (it allocates gradients and AdamW state,
and pages in the kernels' code); then the kernel's resident-set high-water mark is reset to the current resident
memory (``/proc/self/clear_refs`` = 5, Linux >= 4.0) and two more steps run. ``step_peak_mb`` is the high-water
mark after them (``VmHWM`` in ``/proc/self/status``: exact, no sampling; not ``ru_maxrss``, which after ``exec``
also holds the spawning process's mark) minus the resident memory at
the reset: what a step needs on top of the model, its gradients and optimizer state (activations kept for backward,
workspace); ``None`` where the reset is refused. ``total_peak_mb`` is the highest high-water mark over the resident
memory before the model was built (model, gradients, optimizer state, a step, and code paged in by the first step).
``tracemalloc`` is not used: it does not see torch's C++ allocations.

    python benchmarks/step_3d.py [--quick] [--size 64] [--batch-size 2] [--repeats 5] [--threads 1]
                                 [--models blackbox protopnet ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import resnet10
from torch import nn

from pellucid.models import list_models
from pellucid.training.evaluate import config_settings, machine, phantom_batch, phantom_module, training_step
from pellucid.training.evaluate_measures import resident_mb

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "configs" / "experiments"
REFERENCE = "monai_resnet10"
MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"  # glibc: a fixed threshold returns every large block to the system
SETTINGS = ("model_kwargs", "loss_weights")
Step = Callable[[], None]


# --------------------------------------------------------------------------------------------------- models
def volume_batch(size: int, batch_size: int) -> dict[str, Any]:
    """``batch_size`` 3D phantoms at ``size``^3: generated at 64^3 (2 mm) and resampled when ``size`` differs.

    The phantom needs a field of view that holds its largest lesion; a smoke run at 16^3 resamples the 64^3 volumes
    (image trilinear, masks nearest) rather than shrinking the lesions.
    """
    batch = phantom_batch(3, batch_size, image_size=64)
    if size == 64:
        return batch
    for key, mode in (("image", "trilinear"), ("mask", "nearest"), ("confounder_mask", "nearest")):
        if isinstance(batch.get(key), torch.Tensor):
            batch[key] = nn.functional.interpolate(batch[key].float(), size=(size,) * 3, mode=mode)
    return batch


def settings(family: str) -> tuple[dict[str, Any], str | None]:
    """``model_kwargs`` and ``loss_weights`` of the family's 3D phantom experiment (empty: registry defaults)."""
    config = EXPERIMENTS / f"{family}_phantom3d.yaml"
    if not config.is_file():
        return {}, None
    chosen = config_settings(config, keys=("model", *SETTINGS))
    if chosen.pop("model", family) != family:
        raise ValueError(f"{config}: model is not {family!r}; expected each *_phantom3d.yaml to train its own family")
    return chosen, str(config.relative_to(ROOT))


def classification_families(size: int) -> list[str]:
    """Registered families whose 3D output has ``logits`` (probed on one ``size``^3 volume)."""
    found = []
    for family in list_models():
        module = phantom_module(family, 3, seed=0, **settings(family)[0])
        with torch.no_grad():
            output = module.model.eval()(torch.zeros(1, 1, size, size, size))
        if output.logits is not None:
            found.append(family)
    return found


def reference_step(batch: dict[str, Any]) -> tuple[Step, nn.Module]:
    """MONAI's 3D ResNet-10: one cross-entropy + AdamW step on ``batch``."""
    torch.manual_seed(0)
    network = resnet10(spatial_dims=3, n_input_channels=1, num_classes=3).train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(network(batch["image"]), batch["label"]).backward()
        optimizer.step()

    return step, network


def family_step(family: str, batch: dict[str, Any]) -> tuple[Step, nn.Module]:
    """The family's training step (``InterpretableModule``'s loss and optimizer) on ``batch``."""
    module = phantom_module(family, 3, seed=0, **settings(family)[0])
    run = training_step(module, batch)
    return lambda: run(False), module


def build(name: str, batch: dict[str, Any]) -> tuple[Step, nn.Module]:
    """The reference's or a family's step."""
    return reference_step(batch) if name == REFERENCE else family_step(name, batch)


# ----------------------------------------------------------------------------------------------------- time
def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


def interleaved(family: Step, reference: Step, repeats: int) -> dict[str, Any]:
    """One warm-up step each, then ``repeats`` x (family, reference); medians (s) and ratios on both clocks."""
    family()
    reference()
    times: dict[str, list[tuple[float, float]]] = {"family": [], "reference": []}
    for _ in range(repeats):
        for role, step in (("family", family), ("reference", reference)):
            wall, cpu = _clocks()
            step()
            now_wall, now_cpu = _clocks()
            times[role].append((now_wall - wall, now_cpu - cpu))
    medians = {role: [statistics.median(t[clock] for t in values) for clock in (0, 1)]
               for role, values in times.items()}
    return {"family_wall_s": medians["family"][0], "reference_wall_s": medians["reference"][0],
            "family_cpu_s": medians["family"][1], "reference_cpu_s": medians["reference"][1],
            "wall_ratio": medians["family"][0] / medians["reference"][0],
            "cpu_ratio": medians["family"][1] / max(medians["reference"][1], 1e-9),
            "family_steps_wall_s": [t[0] for t in times["family"]],
            "reference_steps_wall_s": [t[0] for t in times["reference"]]}


# --------------------------------------------------------------------------------------------------- memory
def _high_water_mark_mb() -> float:
    """The kernel's resident high-water mark of this process (``VmHWM``), in MB.

    Not ``ru_maxrss``: after ``exec`` it also carries the high-water mark of the process that spawned this one.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM line; peak memory needs Linux")


def _reset_high_water_mark() -> bool:
    """Set the kernel's resident high-water mark to the current resident memory (Linux >= 4.0); whether it worked."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_memory(name: str, size: int, batch_size: int, threads: int) -> dict[str, Any]:
    """Run in a fresh process: resident memory at each stage, and the exact peak of two steps after a warm-up."""
    torch.set_num_threads(threads)
    batch = volume_batch(size, batch_size)
    start_mb = resident_mb()
    step, network = build(name, batch)
    built_mb = resident_mb()
    step()  # allocates gradients and optimizer state, and pages in the kernels' code
    first_peak_mb = _high_water_mark_mb()
    reset = _reset_high_water_mark()
    warm_mb = resident_mb()
    step()
    step()
    peak_mb = _high_water_mark_mb()
    return {"parameters": sum(p.numel() for p in network.parameters()),
            "model_mb": round(built_mb - start_mb, 1), "warm_state_mb": round(warm_mb - built_mb, 1),
            "step_peak_mb": round(peak_mb - warm_mb, 1) if reset else None,
            "total_peak_mb": round(max(first_peak_mb, peak_mb) - start_mb, 1)}


def peak_memory(name: str, size: int, batch_size: int, threads: int) -> dict[str, Any]:
    """:func:`_peak_memory` in a fresh spawned process with a fixed malloc mmap threshold (see the module docstring)."""
    previous = os.environ.get(MMAP_THRESHOLD)
    os.environ[MMAP_THRESHOLD] = "131072"
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(_peak_memory, (name, size, batch_size, threads))
    finally:
        if previous is None:
            os.environ.pop(MMAP_THRESHOLD)
        else:
            os.environ[MMAP_THRESHOLD] = previous


# ------------------------------------------------------------------------------------------------------ run
def _ratio(value: float | None, reference: float | None) -> float | None:
    return None if value is None or not reference else value / reference


def run(families: Sequence[str], size: int, batch_size: int, repeats: int, threads: int) -> dict[str, Any]:
    """Time every family against the reference (interleaved, one process) and measure each one's peak memory."""
    torch.set_num_threads(threads)
    batch = volume_batch(size, batch_size)
    reference, _ = reference_step(batch)
    start = time.perf_counter()
    memory = {name: peak_memory(name, size, batch_size, threads) for name in [REFERENCE, *families]}
    rows = {}
    for family in families:
        step, _ = family_step(family, batch)
        rows[family] = {"settings": settings(family)[1] or "registry defaults", **interleaved(step, reference, repeats),
                        **memory[family],
                        "step_memory_ratio": _ratio(memory[family]["step_peak_mb"], memory[REFERENCE]["step_peak_mb"]),
                        "total_memory_ratio": _ratio(memory[family]["total_peak_mb"],
                                                     memory[REFERENCE]["total_peak_mb"])}
        del step
    return {"benchmark": "step_3d", "volume": [size] * 3, "batch_size": batch_size, "repeats": repeats,
            "torch_threads": torch.get_num_threads(),
            "reference": {"name": "monai.networks.nets.resnet10(spatial_dims=3, n_input_channels=1, num_classes=3)",
                          "optimizer": "AdamW(lr=1e-3)", **memory[REFERENCE]},
            "memory_method": "fresh spawned process per model, MALLOC_MMAP_THRESHOLD_=131072; after one warm-up "
                             "step the resident high-water mark is reset (/proc/self/clear_refs); step_peak_mb = "
                             "VmHWM after two steps minus the resident memory at the reset; total_peak_mb = the "
                             "highest VmHWM minus the resident memory before building the model",
            "families": rows, "wall_s": round(time.perf_counter() - start, 1), "machine": machine()}


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    return value


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def table(report: dict[str, Any]) -> str:
    """A markdown table of the report."""
    reference = report["reference"]
    lines = ["| model | time ratio (CPU clock) | time ratio (wall) | median step, CPU s (reference) | step peak MB "
             "(ratio) | total peak MB (ratio) | parameters |", "|---|---|---|---|---|---|---|",
             f"| {REFERENCE} (reference) | 1 | 1 | - | {reference['step_peak_mb']} | {reference['total_peak_mb']} | "
             f"{reference['parameters']:,} |"]
    for family, row in report["families"].items():
        lines.append(f"| {family} | {_g(row['cpu_ratio'])} | {_g(row['wall_ratio'])} | {_g(row['family_cpu_s'])} "
                     f"({_g(row['reference_cpu_s'])}) | {row['step_peak_mb']} ({_g(row['step_memory_ratio'])}) | "
                     f"{row['total_peak_mb']} ({_g(row['total_memory_ratio'])}) | {row['parameters']:,} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 16^3 volumes, 1 repetition")
    parser.add_argument("--size", type=int, default=64, help="voxels per axis")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved (family, reference) pairs per family")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--models", nargs="+", help="families to measure (default: every classification family)")
    parser.add_argument("--json", type=Path, help="also write the report to this JSON file")
    arguments = parser.parse_args(argv)
    if arguments.quick:
        arguments.size, arguments.repeats = 16, 1
    torch.set_num_threads(arguments.threads)
    families = arguments.models or classification_families(arguments.size)
    unknown = sorted(set(families) - set(list_models()))
    if unknown:
        parser.error(f"--models: unknown {unknown}; registered: {list_models()}")
    report = _rounded(run(families, arguments.size, arguments.batch_size, arguments.repeats, arguments.threads))
    text = json.dumps(report, indent=2)
    if arguments.json:
        arguments.json.write_text(text + "\n", encoding="utf-8")
    print(table(report), file=sys.stderr)
    print(text)
    return report


if __name__ == "__main__":
    main()
