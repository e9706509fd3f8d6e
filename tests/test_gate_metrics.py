"""Per-gate-level localization metrics and the callback that logs them from validation/test outputs."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from synthetic import RandomDataModule

from pellucid.models import ModelOutput
from pellucid.training import InterpretableModule
from pellucid.training.elements.gates import GateLocalization, GateLocalizationCallback


def lesion_mask(batch: int = 2, size: int = 8) -> torch.Tensor:
    mask = torch.zeros(batch, 1, size, size)
    mask[:, :, 2:4, 2:4] = 1  # 4 pixels
    return mask


def test_each_gate_level_is_scored_against_the_mask_at_input_resolution() -> None:
    mask = lesion_mask(batch=1)
    fine = torch.zeros(1, 1, 8, 8)
    fine[0, 0, 2:4, 2:4] = 1.0
    fine[0, 0, 6, 6] = 2.0  # the peak is outside: pointing game misses; mass 4 inside, 2 outside
    coarse = torch.zeros(1, 1, 4, 4)
    coarse[0, 0, 1, 1] = 1.0  # the cell covering pixels 2-3: resized, its peak lies inside the lesion
    metrics = GateLocalization()
    metrics.update(ModelOutput(segmentation=torch.zeros(1, 2, 8, 8), attention=(coarse, fine)), mask)
    results = {key: float(value) for key, value in metrics.compute().items()}
    assert results["gate_0/pointing_game"] == 1.0
    assert results["gate_1/pointing_game"] == 0.0
    assert results["gate_1/energy_inside_mask"] == pytest.approx(4 / 6)
    assert results["gate_1/dice"] == pytest.approx(2 * 4 / (5 + 4))
    assert "localization/pointing_game" not in results  # the output had no localization


def test_scans_without_lesion_are_skipped_and_reset_forgets() -> None:
    metrics = GateLocalization()
    hit = torch.zeros(2, 1, 8, 8)
    hit[:, :, 3, 3] = 1.0
    mask = lesion_mask()
    mask[1] = 0  # the second scan has no lesion: it must not count as a miss
    metrics.update(ModelOutput(logits=torch.zeros(2, 3), attention=(hit,)), mask)
    assert float(metrics.compute()["gate_0/pointing_game"]) == 1.0
    metrics.reset()
    miss = torch.zeros(2, 1, 8, 8)
    miss[:, :, 7, 7] = 1.0
    metrics.update(ModelOutput(logits=torch.zeros(2, 3), attention=(miss,)), lesion_mask())
    assert float(metrics.compute()["gate_0/pointing_game"]) == 0.0


def test_class_localization_is_scored_for_each_samples_class() -> None:
    localization = torch.zeros(2, 3, 8, 8)
    localization[:, 1, 3, 3] = 1.0  # class 1 points at the lesion
    localization[:, 2, 7, 7] = 1.0  # class 2 points away
    output = ModelOutput(logits=torch.zeros(2, 3), localization=localization)
    metrics = GateLocalization()
    metrics.update(output, lesion_mask(), classes=torch.tensor([1, 2]))
    assert float(metrics.compute()["localization/pointing_game"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"class-specific localization \(2, 3, 8, 8\) needs each sample's class"):
        metrics.update(output, lesion_mask())


def test_a_changing_number_of_gates_is_an_error() -> None:
    metrics = GateLocalization()
    gate = torch.rand(2, 1, 8, 8)
    metrics.update(ModelOutput(logits=torch.zeros(2, 3), attention=(gate, gate)), lesion_mask())
    with pytest.raises(ValueError, match=r"output has 1 attention gates, earlier outputs had 2"):
        metrics.update(ModelOutput(logits=torch.zeros(2, 3), attention=(gate,)), lesion_mask())


class CollectOutputs(pl.Callback):
    def __init__(self) -> None:
        self.batches: list[tuple[ModelOutput, torch.Tensor, torch.Tensor]] = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.batches.append((outputs, batch["mask"], batch["label"]))


def test_callback_logs_every_level_during_validation_and_test(tmp_path) -> None:
    torch.manual_seed(0)
    module = InterpretableModule("attention_classifier", spatial_dims=2, in_channels=1, num_classes=3,
                                 model_kwargs={"channels": [4, 8, 16], "strides": [2, 2, 2]})
    gates, collect = GateLocalizationCallback(), CollectOutputs()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tmp_path, callbacks=[gates, collect])
    data = RandomDataModule(spatial_dims=2, num_samples=8, batch_size=4)
    validated = trainer.validate(module, datamodule=data, verbose=False)[0]
    names = {f"{level}/{metric}" for level in ("gate_0", "gate_1", "localization")
             for metric in ("pointing_game", "energy_inside_mask", "dice")}
    assert {f"val/{name}" for name in names} <= set(validated)
    tested = trainer.test(module, datamodule=data, verbose=False)[0]
    assert {f"test/{name}" for name in names} <= set(tested)
    # the logged numbers are the metrics of exactly the outputs the test steps returned
    expected = GateLocalization()
    for output, mask, label in collect.batches:
        expected.update(output, mask, classes=label)
    for name, value in expected.compute().items():
        assert tested[f"test/{name}"] == pytest.approx(float(value))
        assert gates.last_results["test"][f"test/{name}"] == pytest.approx(float(value))


def test_callback_passes_over_outputs_without_maps_or_batches_without_mask() -> None:
    callback = GateLocalizationCallback()
    callback.on_validation_batch_end(None, None, ModelOutput(logits=torch.zeros(2, 3)), {"mask": lesion_mask()}, 0)
    callback.on_validation_batch_end(None, None, ModelOutput(attention=(torch.rand(2, 1, 8, 8),)), {"label": 0}, 0)
    assert callback.metrics["val"].compute() == {}
