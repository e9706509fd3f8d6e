"""bf16 mixed precision (``precision="bf16-mixed"``, CPU autocast): every registered model trains and explains."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from explain_toys import single_threaded  # noqa: F401 - a fixture, used through pytestmark
from synthetic import RandomDataModule

from pellucid.models import list_models, validate_output
from pellucid.training import InterpretableModule

pytestmark = pytest.mark.usefixtures("single_threaded")

SEGMENTERS = {"attention_unet"}


class LossRecord(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("name", list_models())
def test_bf16_mixed_training_and_explained_prediction(name: str, tmp_path) -> None:
    segmenter = name in SEGMENTERS
    num_classes = 2 if segmenter else 3
    data = RandomDataModule(spatial_dims=2, num_samples=8, batch_size=4, num_classes=num_classes)
    torch.manual_seed(0)
    module = InterpretableModule(name, spatial_dims=2, in_channels=1, num_classes=num_classes,
                                 task="segmentation" if segmenter else "multiclass", concepts=data.concept_specs)
    record = LossRecord()
    trainer = pl.Trainer(accelerator="cpu", precision="bf16-mixed", max_epochs=1, limit_train_batches=2,
                         limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                         callbacks=[record])
    trainer.fit(module, datamodule=data)
    assert len(record.losses) == 2 and all(math.isfinite(loss) for loss in record.losses), record.losses
    assert all(p.dtype == torch.float32 for p in module.parameters())  # mixed: weights stay float32
    output = trainer.predict(module, dataloaders=data.predict_dataloader(), return_predictions=True)[0]
    validate_output(output, next(iter(data.predict_dataloader()))["image"], num_classes=num_classes)
    assert output.localization is not None and output.localization.dtype == torch.float32  # maps stay float32
