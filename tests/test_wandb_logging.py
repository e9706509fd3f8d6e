"""W&B explanation logging: an offline run in tmp_path holds the overlays, galleries, concept table and curves."""

from __future__ import annotations

import json

import pytest
import pytorch_lightning as pl
import torch
from explain_toys import (
    single_threaded,  # noqa: F401 - a fixture, used through pytestmark
    toy_transparent,
)
from synthetic import RandomDataModule

import wandb
from pellucid.training import InterpretableModule
from pellucid.training.elements.callback import FiveElementMetrics
from pellucid.training.elements.registry import get_metric
from pellucid.training.outputs.figures import overlay_figure
from pellucid.training.outputs.wandb_logging import WandbExplanationLogger, init_run

pytestmark = pytest.mark.usefixtures("single_threaded")
def fit(tmp_path, logger: WandbExplanationLogger, max_epochs: int = 1, spatial_dims: int = 2) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=tmp_path, max_epochs=max_epochs,
                         limit_train_batches=1, num_sanity_val_steps=0,
                         callbacks=[FiveElementMetrics(deletion_samples=2, deletion_fractions=(0.0, 0.5, 1.0)),
                                    logger])
    module = InterpretableModule(toy_transparent(spatial_dims), task="multiclass",
                                 class_names=["zero", "one", "two"])
    trainer.fit(module, datamodule=RandomDataModule(spatial_dims=spatial_dims, num_samples=4, batch_size=4))
    return trainer


def test_the_offline_run_folder_holds_every_kind_of_explanation_media(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default
    fit(tmp_path, WandbExplanationLogger(num_samples=2, save_dir=str(tmp_path)))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    media = runs[0] / "files" / "media"
    images = [p.relative_to(media).as_posix() for p in media.rglob("*.png")]
    for kind in ("overlay/sample-0-0", "overlay/sample-0-1", "prototypes/sample-0-0", "curve/deletion",
                 "curve/intervention"):
        assert any(kind in path for path in images), (kind, images)
    assert not any("sample-0-2" in path for path in images)  # only the followed samples
    tables = {f"{p.relative_to(media).parent.as_posix()}/{p.name.split('_')[0]}": p
              for p in media.rglob("*.table.json")}
    assert sorted(tables) == ["table/val/explain/concepts", "table/val/five/definitions"]
    table = json.loads(tables["table/val/explain/concepts"].read_text())
    assert table["columns"] == ["id", "concept", "unit", "predicted", "true"]
    assert {(row[1], row[2]) for row in table["data"]} == {("a", "probability"), ("b", "mm")}
    definitions = json.loads(tables["table/val/five/definitions"].read_text())
    assert definitions["columns"][:2] == ["element", "metric"] and definitions["columns"][-1] == "definition"
    for _element, name, _value, unit, _higher, definition in definitions["data"]:  # each value beside its definition
        assert get_metric(name, **({"unit": unit} if unit else {})).definition == definition, name
    assert any(row[1] == "intervention_gain" for row in definitions["data"])


def test_3d_overlays_show_the_three_orthogonal_slices_through_the_evidence_peak() -> None:
    evidence = torch.zeros(8, 10, 12)
    evidence[3, 5, 7] = 1.0
    figure = overlay_figure(torch.rand(1, 8, 10, 12), evidence, title="3d")
    titles = [axis.get_title() for axis in figure.axes if axis.get_title().startswith("image")]
    assert titles == ["image axial slice 3", "image coronal slice 5", "image sagittal slice 7"]


def test_logging_happens_every_n_epochs(tmp_path, monkeypatch) -> None:
    calls = []
    logger = WandbExplanationLogger(every_n_epochs=2, num_samples=1, save_dir=str(tmp_path), mode="disabled")
    monkeypatch.setattr(logger, "log_explanations", lambda trainer, module, stage: calls.append(trainer.current_epoch))
    fit(tmp_path, logger, max_epochs=4)
    assert calls == [1, 3]


def test_an_online_run_without_network_falls_back_to_offline(tmp_path, monkeypatch) -> None:
    real_init, modes = wandb.init, []

    def no_network(*args, mode=None, **kwargs):
        modes.append(mode)
        if mode == "online":
            raise wandb.errors.CommError("dial tcp: lookup api.wandb.ai: no such host")
        return real_init(*args, mode=mode, **kwargs)

    monkeypatch.setattr(wandb, "init", no_network)
    with pytest.warns(UserWarning, match="W&B online initialisation failed.*logging offline"):
        run = init_run(tmp_path, mode="online", init_timeout=1.0)
    run.finish()
    assert modes == ["online", "offline"]
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_bad_mode_is_named() -> None:
    with pytest.raises(ValueError, match="mode must be 'offline', 'online' or 'disabled', got 'sometimes'"):
        WandbExplanationLogger(mode="sometimes")
