"""GPU path check for a maintainer with a CUDA machine: bf16 training, DDP over the GPUs, 3D memory.

STATUS: run once, 2026-11-26, on one NVIDIA H200 (torch 2.11.0+cu130, pytorch-lightning 2.6.6, MONAI 1.6.1):
every check passed (``docs/benchmarks/gpu_check_h200.json``); the DDP part needs 2 or more GPUs and has not run on
GPUs yet (its CPU twin, ``tests/test_ddp.py``, runs in the suite).

1. ``bf16``: every registered model, 2D, trains 3 steps with ``precision="bf16-mixed"`` on one GPU (finite losses)
   and predicts with explanations (``ModelOutput`` validates; ``localization`` is float32).
2. ``ddp`` (only with >= 2 GPUs): a small ProtoPNet trains 2 steps per process with ``strategy="ddp_spawn"`` over
   every visible GPU (NCCL), with the five-element metrics on validation; the run must finish and report them.
3. ``memory_3d``: peak GPU memory (``torch.cuda.max_memory_allocated``) of one training step of the shipped 3D
   ProtoPNet (``configs/experiments/protopnet_phantom3d.yaml``) on 64^3 phantoms, batch 2, in float32 and in
   bf16 autocast, measured after a warm-up step (so the AdamW state already exists).

    python benchmarks/gpu_check.py [--skip-ddp] [--json results.json]

Takes a minute or two on one modern GPU (most of it process start-up and phantom generation).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from pellucid.models import list_models, validate_output
from pellucid.training.data import PhantomDataModule
from pellucid.training.evaluate import (
    FiveElementMetrics,
    config_settings,
    machine,
    phantom_batch,
    phantom_module,
    training_step,
)

EXPERIMENT_3D = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "protopnet_phantom3d.yaml"

SEGMENTERS = {"attention_unet"}
TINY_PROTOPNET = {"prototypes_per_class": 2, "prototype_channels": 16,
                  "backbone_kwargs": {"channels": [8, 16], "strides": [2, 2]}}


class _LossRecord(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))


def _trainer(root: Path, **options: Any) -> pl.Trainer:
    settings = dict(accelerator="gpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, default_root_dir=root,
                    num_sanity_val_steps=0)
    settings.update(options)
    return pl.Trainer(**settings)


def check_bf16(root: Path) -> dict[str, Any]:
    """Every registered model: 3 bf16-mixed training steps and one explained prediction batch on one GPU."""
    results: dict[str, Any] = {}
    for name in list_models():
        segmenter = name in SEGMENTERS
        data = PhantomDataModule(spatial_dims=2, num_train=48, num_val=16, num_test=16, batch_size=16,
                                 task="segmentation" if segmenter else "multiclass")
        module = phantom_module(name, 2, segmentation=segmenter)
        record = _LossRecord()
        trainer = _trainer(root / name, precision="bf16-mixed", max_epochs=1, limit_train_batches=3,
                           limit_val_batches=1, callbacks=[record])
        try:
            trainer.fit(module, datamodule=data)
            output = trainer.predict(module, datamodule=data, return_predictions=True)[0]
            data.setup()
            image = next(iter(DataLoader(data.datasets["predict"], batch_size=16)))["image"]
            validate_output(output, image, num_classes=data.num_classes)
            ok = all(math.isfinite(v) for v in record.losses) and output.localization.dtype == torch.float32
            results[name] = {"ok": ok, "losses": [round(v, 4) for v in record.losses],
                             "localization_dtype": str(output.localization.dtype)}
        except Exception as error:  # report every model, not only the first failure
            results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    return results


def check_ddp(root: Path, devices: int) -> dict[str, Any]:
    """A small ProtoPNet over ``devices`` GPUs (ddp_spawn, NCCL): 2 steps per process, then validation metrics."""
    module = phantom_module("protopnet", 2, seed=0, model_kwargs=TINY_PROTOPNET)
    data = PhantomDataModule(spatial_dims=2, num_train=16 * devices, num_val=8 * devices, num_test=8, batch_size=8)
    trainer = _trainer(root / "ddp", devices=devices, strategy="ddp_spawn", max_epochs=1, limit_train_batches=2,
                       callbacks=[FiveElementMetrics(deletion_samples=4, deletion_fractions=(0.0, 0.5, 1.0))])
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    return {"ok": bool(metrics) and all(math.isfinite(v) for v in metrics.values() if not math.isnan(v)),
            "devices": devices, "seconds": round(time.perf_counter() - start, 1),
            "val_accuracy": metrics.get("val/accuracy"), "val_metrics_logged": len(metrics)}


def memory_3d(size: int = 64, batch_size: int = 2) -> dict[str, Any]:
    """Peak GPU memory of one training step of the shipped 3D ProtoPNet, float32 and bf16 autocast."""
    batch = phantom_batch(3, batch_size, image_size=size, device="cuda")
    settings = config_settings(EXPERIMENT_3D, keys=("model", "model_kwargs", "loss_weights"))
    results: dict[str, Any] = {"volume": [size] * 3, "batch_size": batch_size, "model": settings}
    for precision in ("float32", "bf16-autocast"):
        module = phantom_module(spatial_dims=3, seed=0, **settings).to("cuda")
        step = training_step(module, batch, bf16_autocast=precision != "float32")

        step()  # warm-up: AdamW state, cuDNN algorithm choice
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        results[precision] = {"step_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                              "step_increase_mb": round((torch.cuda.max_memory_allocated() - before) / 2**20, 1),
                              "resident_before_step_mb": round(before / 2**20, 1),
                              "step_ms": round(1e3 * (time.perf_counter() - start), 1)}
        del module, step
        torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-ddp", action="store_true", help="skip the multi-GPU check")
    parser.add_argument("--root", default="outputs/gpu_check", help="folder for trainer files")
    parser.add_argument("--json", default=None, help="also write the JSON report to this file")
    arguments = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible; run this on a GPU machine")
    root = Path(arguments.root)
    start = time.perf_counter()
    devices = torch.cuda.device_count()
    report: dict[str, Any] = {"gpus": [torch.cuda.get_device_name(i) for i in range(devices)],
                              "bf16_supported": torch.cuda.is_bf16_supported()}
    report["bf16"] = check_bf16(root)
    if devices >= 2 and not arguments.skip_ddp:
        report["ddp"] = check_ddp(root, devices)
    else:
        report["ddp"] = {"skipped": f"{devices} GPU(s) visible" if devices < 2 else "--skip-ddp"}
    report["memory_3d"] = memory_3d()
    report["all_ok"] = all(r.get("ok", False) for r in report["bf16"].values()) and report["ddp"].get("ok", True)
    report["wall_s"] = round(time.perf_counter() - start, 1)
    report["machine"] = machine()
    text = json.dumps(report, indent=2)
    print(text)
    if arguments.json:
        Path(arguments.json).write_text(text + "\n")
    sys.exit(0 if report["all_ok"] else 1)


if __name__ == "__main__":
    main()
