"""DDP on the CPU: two gloo processes (Lightning's ``ddp_spawn``) train, validate, compute metrics and log to W&B.

One two-process fit (module-scoped fixture; each spawn costs seconds of imports) serves every test here:

- training: both processes step, finitely, and hold the same weights afterwards;
- metrics: the validation task metrics, losses and five-element metrics synchronised over the two processes equal
  those of one process validating the same weights on the same data (torchmetrics sync, ``sync_dist``);
- W&B: the explanation logger, offline, opens exactly one run (rank 0), shows the samples one process would
  show (gathered from both shards) and the fit finishes (nothing waits on a collective only one rank enters).

Push and the explanation writer under DDP are tested in ``test_push.py`` and ``test_writer.py``.
"""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from synthetic import _Samples, make_batch
from torch.utils.data import DataLoader

from pellucid.models import ConceptSpec
from pellucid.training import InterpretableModule
from pellucid.training.data.base import PellucidDataModule
from pellucid.training.elements.callback import FiveElementMetrics
from pellucid.training.outputs.wandb_logging import WandbExplanationLogger

TINY = {"prototypes_per_class": 2, "prototype_channels": 8, "backbone_kwargs": {"channels": [8, 16], "strides": [2, 2]}}
TRAIN_BATCHES = 2  # per process
# Stability adds noise seeded by the batch's index within its process: two processes draw other noise for the same
# sample than one process does (an equally valid estimate, not the same number). Every other metric must agree.
SEEDED_BY_BATCH_POSITION = {"val/five/visual_recognizability/prototype_stability"}


class EvenData(PellucidDataModule):
    """8 labelled samples with masks, concepts and lesion types; batches of 2.

    An even count, so the two shards are equally large and no sample is repeated to pad one: averages over
    two processes then weigh every sample as one process does.
    """

    def __init__(self, num_samples: int = 8) -> None:
        super().__init__()
        self.spatial_dims, self.in_channels, self.num_classes, self.task = 2, 1, 3, "multiclass"
        self.class_names = ["a", "b", "c"]
        self.concept_specs = [ConceptSpec("a", "binary"), ConceptSpec("b", "continuous", unit="mm")]
        batch = make_batch(2, num_samples, seed=5)
        batch["label"] = torch.arange(num_samples) % 3
        batch["image"] = batch["image"] * 0.1 + batch["label"].float().view(-1, 1, 1, 1)  # learnable
        self.data = _Samples(batch)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=2, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=2)


class TrainingRecord(pl.Callback):
    """Fails the run if the processes disagree on the weights after training; records each step's loss."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer, pl_module) -> None:
        weights = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = trainer.strategy.all_gather(weights)
        if not torch.equal(gathered[0], gathered[-1]):
            raise AssertionError("the processes hold different weights after training")
        if len(self.losses) != TRAIN_BATCHES or not all(math.isfinite(v) for v in self.losses):
            raise AssertionError(f"rank {trainer.global_rank}: expected {TRAIN_BATCHES} finite losses, "
                                 f"got {self.losses}")
        every_step = trainer.strategy.all_gather(torch.tensor(self.losses))  # (processes, steps)
        logged = float(trainer.callback_metrics["train/loss_epoch"])
        if not math.isclose(logged, float(every_step.mean()), rel_tol=1e-5):  # the epoch mean covers every process
            raise AssertionError(f"rank {trainer.global_rank}: train/loss_epoch {logged} is not the mean "
                                 f"{float(every_step.mean())} of every process's steps {every_step.tolist()}")


def five_element_metrics() -> FiveElementMetrics:
    # every validation sample gets a deletion curve in both set-ups (deletion_samples counts per process)
    return FiveElementMetrics(deletion_samples=8, deletion_fractions=(0.0, 0.5, 1.0))


def module() -> InterpretableModule:
    torch.manual_seed(0)
    return InterpretableModule("protopnet", spatial_dims=2, in_channels=1, num_classes=3, model_kwargs=TINY,
                               class_names=["a", "b", "c"], lr=1e-2,
                               recipe="off")  # every group trains (the recipe freezes groups: DDP needs find_unused)


def options(tmp_path) -> dict:
    return dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, default_root_dir=tmp_path, num_sanity_val_steps=0)


@pytest.fixture(scope="module")
def ddp_fit(tmp_path_factory):
    """One fit on two gloo processes: 2 training steps each, then validation, W&B offline."""
    root = tmp_path_factory.mktemp("ddp")
    trained = module()
    callbacks = [TrainingRecord(), five_element_metrics(),
                 WandbExplanationLogger(num_samples=2, save_dir=str(root), mode="offline")]
    trainer = pl.Trainer(devices=2, strategy="ddp_spawn", max_epochs=1, limit_train_batches=TRAIN_BATCHES,
                         callbacks=callbacks, **options(root))
    trainer.fit(trained, datamodule=EvenData())  # weights and callback_metrics come back from rank 0
    return root, trainer, trained


def test_ddp_training_steps_every_process_and_changes_the_weights(ddp_fit) -> None:
    _, trainer, trained = ddp_fit
    assert trainer.world_size == 2 and trainer.state.finished  # TrainingRecord checked each process's steps
    initial = module()
    changed = [not torch.equal(a, b) for a, b in zip(trained.parameters(), initial.parameters(), strict=True)]
    assert any(changed)
    assert math.isfinite(float(trainer.callback_metrics["train/loss_epoch"]))


def test_ddp_validation_metrics_equal_one_process_on_the_same_weights(ddp_fit, tmp_path) -> None:
    _, trainer, trained = ddp_fit
    distributed = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    single = pl.Trainer(devices=1, callbacks=[five_element_metrics()], **options(tmp_path))
    (alone,) = single.validate(trained, datamodule=EvenData())
    assert {"val/accuracy", "val/auroc", "val/loss"} <= set(alone), sorted(alone)
    assert any(k.startswith("val/five/") for k in alone), sorted(alone)
    assert sorted(distributed) == sorted(alone)
    differ = {name: (distributed[name], value) for name, value in alone.items() if name not in SEEDED_BY_BATCH_POSITION
              and not math.isclose(distributed[name], value, rel_tol=1e-5, abs_tol=1e-6)}
    assert not differ, differ


def test_ddp_wandb_logging_opens_one_run_on_rank_zero_with_the_samples_of_every_process(ddp_fit) -> None:
    root, _, _ = ddp_fit
    runs = list((root / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    media = runs[0] / "files" / "media"
    overlays = {p.relative_to(media).as_posix() for p in media.rglob("*.png") if "overlay" in p.as_posix()}
    # the first two validation samples, as one process would follow them: sample 0 is on rank 0, sample 1 on rank 1
    for followed in ("overlay/sample-5-0", "overlay/sample-5-1"):
        assert any(followed in path for path in overlays), (followed, overlays)
    assert not any("sample-5-2" in path or "sample-5-3" in path for path in overlays), overlays
