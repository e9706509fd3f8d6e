"""Recipes: a family's method as data, fitted to any epoch budget and applied by the module for any data."""

from __future__ import annotations

import pytest
import torch
from test_module import trainer
from test_push import TINY, PushData

from pellucid.models.recipe import Phase, PruningOptions, PushOptions, Recipe, fit_phases
from pellucid.training import InterpretableModule, PhaseSchedule
from pellucid.training.prototypes.push import PrototypePush

PROTOTYPE_PHASES = [Phase("warmup", 2, train=["add_on", "prototypes"]), Phase("joint", 15),
                    Phase("last_layer", 1, train=["last_layer"], push=True), Phase("joint_2", 16),
                    Phase("last_layer_2", 6, train=["last_layer"], push=True)]


def protopnet(**kwargs) -> InterpretableModule:
    return InterpretableModule("protopnet", spatial_dims=2, in_channels=1, num_classes=3, model_kwargs=TINY, **kwargs)


def test_a_budget_equal_to_the_recipe_keeps_its_phases_and_any_other_scales_them() -> None:
    assert fit_phases(PROTOTYPE_PHASES, 40) == PROTOTYPE_PHASES
    assert fit_phases(PROTOTYPE_PHASES, None) == PROTOTYPE_PHASES
    for budget in (5, 7, 10, 16, 80):
        fitted = fit_phases(PROTOTYPE_PHASES, budget)
        assert sum(p.epochs for p in fitted) == budget and all(p.epochs >= 1 for p in fitted)
        assert [p.name for p in fitted] == [p.name for p in PROTOTYPE_PHASES]
    assert [p.epochs for p in fit_phases(PROTOTYPE_PHASES, 80)] == [4, 30, 2, 32, 12]


@pytest.mark.parametrize(("budget", "expected"), [
    (1, [("last_layer", 1, True)]),
    (3, [("warmup", 1, False), ("joint", 1, False), ("last_layer", 1, True)]),
    (4, [("warmup", 1, False), ("joint", 2, False), ("last_layer", 1, True)]),
])
def test_a_budget_shorter_than_the_phases_keeps_the_start_and_ends_with_push_and_the_last_layer(
        budget, expected) -> None:
    assert [(p.name, p.epochs, p.push) for p in fit_phases(PROTOTYPE_PHASES, budget)] == expected


def test_an_override_replaces_the_fields_it_gives_and_merges_loss_weights() -> None:
    family = Recipe(phases=PROTOTYPE_PHASES, push=PushOptions(), loss_weights={"cluster": 0.8, "l1": 1e-4})
    override = Recipe(push=PushOptions(pruning=PruningOptions(k=4, min_same_class=2)), loss_weights={"l1": 0.0})
    merged = family.overridden_by(override)
    assert merged.phases == PROTOTYPE_PHASES and merged.push.pruning.k == 4
    assert merged.loss_weights == {"cluster": 0.8, "l1": 0.0}
    with pytest.raises(ValueError, match=r"Recipe.push: unknown key\(s\) \['prunning'\]; valid keys: \[.*'pruning'"):
        Recipe.from_dict({"push": {"prunning": {"k": 3}}})
    with pytest.raises(ValueError, match="phase names must be unique"):
        Recipe(phases=[Phase("a", 1), Phase("a", 1)])


def test_the_module_applies_the_family_recipe_its_weights_and_the_config_overrides() -> None:
    module = protopnet()
    assert module.recipe.pushes and [p.name for p in module.recipe.phases][-1] == "last_layer_2"
    assert module.loss_weights == {"cluster": 0.8, "separation": 0.08, "l1": 1e-4}
    tuned = protopnet(loss_weights={"cluster": 0.5}, recipe=Recipe(phases=[Phase("all", 3, push=True)]))
    assert tuned.loss_weights["cluster"] == 0.5 and tuned.loss_weights["separation"] == 0.08
    assert [p.name for p in tuned.recipe.phases] == ["all"]
    assert protopnet(recipe="off").recipe is None
    assert InterpretableModule("blackbox", spatial_dims=2, in_channels=1, num_classes=3).recipe is None


def test_the_recipe_survives_a_checkpoint_as_plain_values(tmp_path) -> None:
    module = protopnet(recipe=Recipe(phases=[Phase("only", 1, train=["last_layer"], push=True)],
                                     push=PushOptions(pruning=PruningOptions(k=2, min_same_class=1))))
    assert isinstance(module.hparams["recipe"], dict)
    run = trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    run.fit(module, datamodule=PushData())
    run.save_checkpoint(tmp_path / "recipe.ckpt")
    restored = InterpretableModule.load_from_checkpoint(tmp_path / "recipe.ckpt")
    assert restored.recipe == module.recipe


def test_a_fit_runs_the_recipe_without_callbacks_in_the_trainer(tmp_path) -> None:
    run = trainer(tmp_path, max_epochs=3, limit_train_batches=1, limit_val_batches=0)
    run.fit(protopnet(), datamodule=PushData())
    (schedule,) = [c for c in run.callbacks if isinstance(c, PhaseSchedule)]
    (push,) = [c for c in run.callbacks if isinstance(c, PrototypePush)]
    assert [p.name for p in schedule.phases] == ["warmup", "joint", "last_layer"] and push.epochs == [2]
    off = trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    off.fit(protopnet(recipe="off"), datamodule=PushData())
    assert not [c for c in off.callbacks if isinstance(c, PhaseSchedule | PrototypePush)]


def running_means(module: InterpretableModule) -> list[torch.Tensor]:
    return [m.running_mean.clone() for m in module.model.backbone.modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize(("train", "frozen"), [(["last_layer"], True), ("all", False)])
def test_a_frozen_group_keeps_its_batch_norm_statistics(tmp_path, train, frozen) -> None:
    module = protopnet(recipe=Recipe(phases=[Phase("only", 1, train=train)]))
    before = running_means(module)
    assert before, "the tiny backbone has batch norm"
    trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1).fit(module, datamodule=PushData())
    same = all(torch.equal(a, b) for a, b in zip(before, running_means(module), strict=True))
    assert same == frozen
    assert module.training  # the module itself is back in training mode; only the frozen norms are not
