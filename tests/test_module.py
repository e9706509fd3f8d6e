from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from synthetic import RandomDataModule, make_batch

from pellucid.models import ModelOutput, create_model
from pellucid.training import InterpretableModule, NonFiniteLossError


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    options = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=tmp_path, enable_checkpointing=False)
    options.update(kwargs)
    return pl.Trainer(**options)


class CollectOutputs(pl.Callback):
    def __init__(self) -> None:
        self.outputs: dict[str, list] = {"val": [], "test": [], "predict": []}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.outputs["val"].append(outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.outputs["test"].append(outputs)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.outputs["predict"].append(outputs)


def module(**kwargs) -> InterpretableModule:
    options = dict(model="blackbox", spatial_dims=2, in_channels=1, num_classes=3)
    options.update(kwargs)
    return InterpretableModule(**options)


def test_named_groups_get_their_own_learning_rates() -> None:
    optimizer = module(lr=1e-3, group_lr={"head": 5e-2}).configure_optimizers()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == {"backbone": 1e-3, "head": 5e-2}
    with pytest.raises(ValueError, match=r"unknown parameter group\(s\) \['neck'\]; blackbox has groups"):
        module(group_lr={"neck": 1.0})


def test_fit_logs_every_loss_term_and_task_metrics(tmp_path) -> None:
    data = RandomDataModule(spatial_dims=2)
    collect = CollectOutputs()
    run = trainer(tmp_path, max_epochs=1, callbacks=[collect])
    run.fit(module(lr=1e-2), datamodule=data)
    logged = set(run.logged_metrics)
    assert {"train/loss_epoch", "train/loss_classification_epoch", "train/accuracy", "val/loss",
            "val/loss_classification", "val/accuracy", "val/balanced_accuracy", "val/auroc"} <= logged
    first = collect.outputs["val"][0]
    assert isinstance(first, ModelOutput) and first.localization is not None
    assert first.ids == ["sample-0-0", "sample-0-1", "sample-0-2", "sample-0-3"]
    assert not first.logits.requires_grad


def test_checkpoint_rebuilds_the_model_by_itself(tmp_path) -> None:
    data = RandomDataModule(spatial_dims=3)
    trained = module(spatial_dims=3, model_kwargs={"dropout": 0.1, "backbone_kwargs": {"channels": [8, 16]
                                                                                          , "strides": [2, 2]}})
    run = trainer(tmp_path, max_steps=2)
    run.fit(trained, datamodule=data)
    path = tmp_path / "model.ckpt"
    run.save_checkpoint(path)
    restored = InterpretableModule.load_from_checkpoint(path)
    assert restored.hparams.model == "blackbox" and restored.hparams.model_kwargs["dropout"] == 0.1
    image = make_batch(3)["image"]
    trained.eval(), restored.eval()
    torch.testing.assert_close(restored(image, explain=False).logits, trained(image, explain=False).logits)


def test_model_instance_is_injected_and_checkpointed_by_spec(tmp_path) -> None:
    model = create_model("blackbox", 2, in_channels=1, num_classes=3, pooling="max")
    injected = InterpretableModule(model)
    assert injected.model is model
    assert injected.hparams.model == "blackbox" and injected.hparams.model_kwargs == {"pooling": "max"}
    with pytest.raises(ValueError, match="num_classes=4 disagrees with the model's num_classes=3"):
        InterpretableModule(model, num_classes=4)
    with pytest.raises(ValueError, match="num_classes must be given"):
        InterpretableModule("blackbox", spatial_dims=2, in_channels=1)


def test_multilabel_task_trains_and_reports_metrics(tmp_path) -> None:
    data = RandomDataModule(spatial_dims=2, task="multilabel", num_classes=4)
    run = trainer(tmp_path, max_epochs=1)
    run.fit(module(num_classes=4, task="multilabel"), datamodule=data)
    metrics = run.logged_metrics
    assert 0.0 <= float(metrics["val/balanced_accuracy"]) <= 1.0 and "val/auroc" in metrics


def test_test_and_predict_return_explained_outputs(tmp_path) -> None:
    data = RandomDataModule(spatial_dims=2)
    collect = CollectOutputs()
    run = trainer(tmp_path, max_epochs=1, callbacks=[collect])
    net = module()
    results = run.test(net, datamodule=data)
    assert {"test/accuracy", "test/auroc", "test/loss"} <= set(results[0])
    predictions = run.predict(net, datamodule=data)
    assert sum(len(p.ids) for p in predictions) == 16
    assert predictions[0].localization.shape == (4, 3, 32, 32)


def test_non_finite_loss_stops_training_naming_term_and_step(tmp_path, monkeypatch) -> None:
    net = module()
    calls = {"n": 0}
    original = net.model.loss_terms

    def poisoned(output, batch):
        calls["n"] += 1
        terms = original(output, batch)
        if calls["n"] == 3:
            terms["classification"] = terms["classification"] * float("nan")
        return terms

    monkeypatch.setattr(net.model, "loss_terms", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"loss term 'classification' is nan at global step 2"):
        trainer(tmp_path, max_epochs=1, num_sanity_val_steps=0).fit(net, datamodule=RandomDataModule())


def test_loss_weights_scale_terms_and_unknown_terms_fail() -> None:
    batch = make_batch(2)
    net = module(loss_weights={"classification": 0.5})
    output = net(batch["image"], explain=False)
    total, terms = net.compute_loss(output, batch)
    torch.testing.assert_close(total, 0.5 * terms["classification"])
    with pytest.raises(ValueError, match=r"unknown loss term\(s\) \['clusterr'\]; blackbox makes \['classification'\]"):
        module(loss_weights={"clusterr": 1.0}).compute_loss(output, batch)


def test_cosine_factor_warms_up_then_decays_to_zero() -> None:
    from pellucid.training.module import cosine_factor

    factors = [cosine_factor(step, total_steps=10, warmup_steps=2) for step in range(11)]
    assert factors[:2] == [0.5, 1.0] and factors[2] == 1.0
    assert all(a >= b for a, b in zip(factors[2:], factors[3:], strict=False)) and factors[10] == 0.0


def test_segmentation_task_uses_dice_and_iou() -> None:
    from pellucid.training.metrics import task_metrics

    metrics = task_metrics("segmentation", 2, prefix="val/")
    truth = torch.zeros(2, 8, 8, dtype=torch.long)
    truth[:, 2:6, 2:6] = 1  # 16 lesion pixels per image
    predicted = torch.zeros_like(truth)
    predicted[:, 2:6, 2:4] = 1  # 8 of them found, no false positives
    metrics.update(predicted, truth)
    values = metrics.compute()
    assert values["val/dice"].item() == pytest.approx(2 * 8 / (8 + 16))
    assert values["val/iou"].item() == pytest.approx(8 / 16)
