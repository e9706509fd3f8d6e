"""What explanations cost: a training step and a prediction with explanations on versus off, per registered model.

What "explanation hooks" are in pellucid: every model computes its explanation in its own forward pass
(``forward(image, explain=...)``); no forward/backward hooks are attached during training. Gate maps, concepts and
concept maps are part of the decision and are always computed; prototype maps only when explained or a loss term
reads them (mask guidance); ``explain=True`` adds them and the class ``localization`` at input resolution (and, for
the black-box baseline, Grad-CAM). ``InterpretableModule``
trains with ``explain=False`` and no callback computes explanations on training batches (they all work on
validation, test and predict batches), so the shipped training step costs exactly the "hooks off" step below.

1. Training step: forward + the model's own weighted ``loss_terms`` (``InterpretableModule.compute_loss``) +
   backward + optimizer step, with ``explain=True`` (every explanation on) versus ``explain=False`` on the same
   network and batch. Target: <= 1.05x.
2. Prediction (eval mode, ``torch.inference_mode`` as in ``Trainer.predict``): ``explain=True`` (full
   explanation) versus ``explain=False`` (logits/segmentation and what the decision needs). Target: <= 1.10x.

Each model is built with its shipped config (``configs/model/<name>.yaml``: ``model_kwargs`` and
``loss_weights``; ``cbm_spatial`` uses cbm's, ``protopnet_cosine`` protopnet's) on 2D phantoms, 64x64,
batch 32. The two variants alternate (order flipped every repetition) and the ratio is taken per repetition;
the median is reported, so load from other processes largely cancels. One torch thread by default: the ratio of
work done; with several threads on a loaded machine a parallel op waits for its slowest thread and the ratios
scatter widely (``--threads 0`` for torch's own choice on an idle machine). Both clocks are reported: wall time and
the CPU time of the one thread that runs every operation; with one thread the targets are judged on the CPU time,
which other processes on a shared machine disturb far less (with more threads, on wall time).

    python benchmarks/explanation_overhead.py [--quick] [--models protopnet cbm] [--repeats 7] [--steps 3]
        [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pellucid.models import list_models
from pellucid.training import InterpretableModule
from pellucid.training.evaluate import config_settings, machine, phantom_batch, phantom_module, training_step

ROOT = Path(__file__).resolve().parents[1]
CONFIG_OF = {"cbm_spatial": "cbm", "protopnet_cosine": "protopnet"}
SEGMENTERS = {"attention_unet"}
TARGETS = {"train_step": 1.05, "predict": 1.10}  # issue 22
CLOCK = {True: "cpu_", False: ""}  # the ratio judged: one thread's CPU time with one thread, else wall time
BATCH_SIZE = 32


def shipped_settings(name: str) -> dict[str, Any]:
    """``model_kwargs`` and ``loss_weights`` of the model's shipped config (empty if it has none)."""
    path = ROOT / "configs" / "model" / f"{CONFIG_OF.get(name, name)}.yaml"
    return config_settings(path, keys=("model_kwargs", "loss_weights")) if path.exists() else {}


def build_module(name: str) -> InterpretableModule:
    """The model inside the training module, as the CLI builds it for the 2D phantom data."""
    return phantom_module(name, 2, segmentation=name in SEGMENTERS, seed=0, **shipped_settings(name))


def _seconds(run: Callable[[], None], steps: int) -> tuple[float, float]:
    """Wall-clock and this thread's CPU seconds per call of ``run``."""
    wall, cpu = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        run()
    return (time.perf_counter() - wall) / steps, (time.thread_time() - cpu) / steps


def _alternate(variants: dict[str, Callable[[], None]], repeats: int, steps: int) -> dict[str, Any]:
    """Time ``on`` and ``off`` alternately (order flipped each repetition); median of the per-repetition ratios.

    Both clocks: wall time, and the CPU time of this thread (with one torch thread every operation, backward
    included, runs on it), which other processes on a shared machine disturb far less.
    """
    for run in variants.values():  # warm-up: allocator pools, lazy initialisation, first-call dispatch
        run()
    times: dict[str, list[tuple[float, float]]] = {"on": [], "off": []}
    for repeat in range(repeats):
        for key in (("on", "off") if repeat % 2 == 0 else ("off", "on")):
            times[key].append(_seconds(variants[key], steps))
    result: dict[str, Any] = {}
    for clock, index in (("", 0), ("cpu_", 1)):
        ratios = [on[index] / off[index] for on, off in zip(times["on"], times["off"], strict=True)]
        result.update({f"{clock}ms_on": round(1e3 * statistics.median(t[index] for t in times["on"]), 2),
                       f"{clock}ms_off": round(1e3 * statistics.median(t[index] for t in times["off"]), 2),
                       f"{clock}ratio_median": round(statistics.median(ratios), 3),
                       f"{clock}ratio_min": round(min(ratios), 3), f"{clock}ratio_max": round(max(ratios), 3)})
    return result


def train_step_ratio(module: InterpretableModule, batch: dict[str, Any], repeats: int, steps: int) -> dict[str, Any]:
    """Training step with ``explain=True`` over ``explain=False`` (same network, optimizer and batch)."""
    step = training_step(module, batch)  # one optimizer for both
    return _alternate({"on": lambda: step(True), "off": lambda: step(False)}, repeats, steps)


def predict_ratio(module: InterpretableModule, batch: dict[str, Any], repeats: int, steps: int) -> dict[str, Any]:
    """Prediction with the full explanation over logits only, in eval and inference mode."""
    module.eval()

    def predict(explain: bool) -> None:
        with torch.inference_mode():
            module.model(batch["image"], explain=explain)

    return _alternate({"on": lambda: predict(True), "off": lambda: predict(False)}, repeats, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 repetitions of 1 step")
    parser.add_argument("--models", nargs="+", default=None, help="registry names (default: every model)")
    parser.add_argument("--repeats", type=int, default=7, help="on/off pairs per measurement")
    parser.add_argument("--steps", type=int, default=3, help="steps timed together in one repetition")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 0 = torch's choice (default 1: on a loaded machine a multi-threaded op "
                             "waits for its slowest thread, which swamps the ratios)")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.repeats, arguments.steps = 3, 1
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    start = time.perf_counter()
    batch = phantom_batch(2, BATCH_SIZE)
    results: dict[str, Any] = {}
    for name in arguments.models or list_models():
        module = build_module(name)
        results[name] = {"train_step": train_step_ratio(module, batch, arguments.repeats, arguments.steps),
                         "predict": predict_ratio(module, batch, arguments.repeats, arguments.steps)}
        for kind, target in TARGETS.items():
            measured = results[name][kind][f"{CLOCK[arguments.threads == 1]}ratio_median"]
            results[name][kind]["meets_target"] = measured <= target
        if not arguments.json:
            line = "  ".join(f"{kind} {r['ratio_median']:.3f}x wall, {r['cpu_ratio_median']:.3f}x CPU "
                             f"({r['cpu_ms_on']:.1f} / {r['cpu_ms_off']:.1f} CPU ms)"
                             for kind, r in results[name].items())
            print(f"{name:22s} {line}", flush=True)
    report = {"input": {"spatial_dims": 2, "image_size": [64, 64], "batch_size": BATCH_SIZE},
              "repeats": arguments.repeats, "steps_per_repeat": arguments.steps, "targets": TARGETS,
              "models": results, "wall_s": round(time.perf_counter() - start, 1), "machine": machine()}
    if not arguments.json:
        print(__doc__)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
