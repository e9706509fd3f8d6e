"""An interrupted fit resumes from its last checkpoint, in the right phase, and finishes."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from synthetic import RandomDataModule
from test_module import module

from pellucid.training import Phase, PhaseSchedule


class Crash(RuntimeError):
    pass


class CrashAtEpoch(pl.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise Crash(f"simulated crash at epoch {self.epoch}")


def run(tmp_path, callbacks, ckpt_path=None) -> pl.Trainer:
    schedule = PhaseSchedule([Phase("warmup", 1, train=["head"]), Phase("joint", 2)])
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[schedule, checkpoint, *callbacks])
    net = module()
    trainer.fit(net, datamodule=RandomDataModule(), ckpt_path=ckpt_path)
    return trainer


def test_interrupted_fit_resumes_from_last_checkpoint_and_finishes(tmp_path) -> None:
    with pytest.raises(Crash):
        run(tmp_path, [CrashAtEpoch(2)])
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
    resumed = run(tmp_path, [], ckpt_path="last")
    assert resumed.current_epoch == 3 and resumed.global_step == 3 * 4
    assert resumed.lightning_module.current_phase == "joint"
    assert all(p.requires_grad for p in resumed.lightning_module.model.parameters())
