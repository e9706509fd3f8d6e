from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from synthetic import RandomDataModule
from test_module import module, trainer

from pellucid.training import Phase, PhaseSchedule


def test_phase_at_follows_epochs_and_repeats() -> None:
    schedule = PhaseSchedule(
        [Phase("warmup", 2, train=["head"]), Phase("joint", 3), Phase("last_layer", 1, train=["head"])],
        repeat_from="joint",
    )
    names = [schedule.phase_at(epoch).name for epoch in range(12)]
    assert names == ["warmup"] * 2 + ["joint"] * 3 + ["last_layer"] + ["joint"] * 3 + ["last_layer"] + ["joint"] * 2
    held = PhaseSchedule([Phase("frozen", 1, train=["head"]), Phase("unfrozen", 1)])
    assert [held.phase_at(e).name for e in range(4)] == ["frozen", "unfrozen", "unfrozen", "unfrozen"]


def test_invalid_schedules_are_refused() -> None:
    with pytest.raises(ValueError, match="epochs must be >= 1, got 0"):
        Phase("a", 0)
    with pytest.raises(ValueError, match="train must be 'all' or a list"):
        Phase("a", 1, train="head")
    with pytest.raises(ValueError, match="repeat_from='b' is not a phase"):
        PhaseSchedule([Phase("a", 1)], repeat_from="b")
    with pytest.raises(ValueError, match="phase names must be unique"):
        PhaseSchedule([Phase("a", 1), Phase("a", 1)])


class Record(pl.Callback):
    """Snapshot, at the end of each epoch, what trained and at which learning rate."""

    def __init__(self) -> None:
        self.epochs: list[dict] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.start = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}

    def on_train_epoch_end(self, trainer, pl_module):
        changed = {n.split(".")[0] for n, p in pl_module.model.named_parameters() if not torch.equal(p, self.start[n])}
        self.epochs.append({
            "phase": pl_module.current_phase,
            "changed": changed,
            "lr": {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups},
            "weights": dict(pl_module.phase_loss_weights),
        })


def test_phases_freeze_unfreeze_set_lr_and_loss_weights(tmp_path) -> None:
    record = Record()
    schedule = PhaseSchedule([
        Phase("warmup", 1, train=["head"], lr={"head": 0.05}),
        Phase("joint", 1, loss_weights={"classification": 2.0}),
        Phase("finetune", 1, train=["backbone"], lr={"backbone": 1e-4}),
    ])
    run = trainer(tmp_path, max_epochs=3, callbacks=[schedule, record], num_sanity_val_steps=0)
    run.fit(module(lr=1e-3, weight_decay=0.0), datamodule=RandomDataModule())
    warmup, joint, finetune = record.epochs
    assert warmup["phase"] == "warmup" and warmup["changed"] == {"classifier"}
    assert warmup["lr"] == {"backbone": 1e-3, "head": 0.05}
    assert joint["changed"] == {"backbone", "classifier"} and joint["lr"] == {"backbone": 1e-3, "head": 1e-3}
    assert joint["weights"] == {"classification": 2.0} and warmup["weights"] == {}
    assert finetune["changed"] == {"backbone"} and finetune["lr"]["backbone"] == 1e-4
    assert run.logged_metrics["phase"] == 2.0


def test_unknown_group_in_a_phase_fails_before_training(tmp_path) -> None:
    schedule = PhaseSchedule([Phase("warmup", 1, train=["prototypes"])])
    with pytest.raises(ValueError, match=r"phase 'warmup' names unknown parameter group\(s\) \['prototypes'\]"):
        trainer(tmp_path, max_epochs=1, callbacks=[schedule]).fit(module(), datamodule=RandomDataModule())


def test_cosine_schedule_scales_the_phase_learning_rates(tmp_path) -> None:
    record = Record()
    schedule = PhaseSchedule([Phase("warmup", 1, train=["head"], lr={"head": 0.04}), Phase("joint", 1)])
    run = trainer(tmp_path, max_epochs=2, callbacks=[schedule, record], num_sanity_val_steps=0)
    run.fit(module(lr=1e-2, lr_schedule="cosine"), datamodule=RandomDataModule())  # 4 steps per epoch, 8 in all
    warmup, joint = record.epochs
    # after 4 of 8 steps the cosine factor is 0.5; after 8 it is 0
    assert warmup["lr"]["head"] == pytest.approx(0.04 * 0.5) and warmup["lr"]["backbone"] == pytest.approx(1e-2 * 0.5)
    assert joint["lr"]["head"] == pytest.approx(0.0, abs=1e-12)
    scheduler = run.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs == [1e-2, 1e-2]  # joint phase: back to the module's rate
