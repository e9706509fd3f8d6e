"""Every shipped config runs `fit` through the real CLI (fast_dev_run), and the CLI fails early on bad configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pellucid.training.cli import build_cli, main
from pellucid.training.cli_config import deep_merge, merge_model_options

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DATA_2D = CONFIGS / "data" / "phantom2d.yaml"
BLACKBOX = CONFIGS / "model" / "blackbox.yaml"


def partner(config: Path, default: Path) -> Path:
    """The config a fragment runs with: a ``# test-with: configs/...`` line in it, else ``default``."""
    for line in config.read_text().splitlines():
        if line.startswith("# test-with:"):
            return CONFIGS.parent / line.split(":", 1)[1].strip()
    return default


def runs() -> list[tuple[str, list[Path]]]:
    """(test id, config files) for every config: fragments are paired with a partner of the other kind."""
    cases = [(f"experiments/{p.name}", [p]) for p in sorted((CONFIGS / "experiments").glob("*.yaml"))]
    cases += [(f"model/{p.name}", [partner(p, DATA_2D), p]) for p in sorted((CONFIGS / "model").glob("*.yaml"))]
    cases += [(f"data/{p.name}", [p, partner(p, BLACKBOX)]) for p in sorted((CONFIGS / "data").glob("*.yaml"))]
    cases += [(f"finetune/{p.name}", [p, partner(p, DATA_2D)]) for p in sorted((CONFIGS / "finetune").glob("*.yaml"))]
    cases += [(f"predict/{p.name}", [DATA_2D, BLACKBOX, p]) for p in sorted((CONFIGS / "predict").glob("*.yaml"))]
    return cases


CASES = runs()


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch) -> None:
    """Run each CLI call in a fresh folder, as the `pellucid` command with no other arguments."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["pellucid"])


def test_every_config_directory_is_covered() -> None:
    covered = {path for _, files in CASES for path in files}
    assert set(CONFIGS.rglob("*.yaml")) <= covered


@pytest.mark.parametrize("files", [files for _, files in CASES], ids=[name for name, _ in CASES])
def test_config_fits_with_fast_dev_run(files: list[Path]) -> None:
    args = ["fit"]
    for path in files:
        args += ["--config", str(path)]
    main([*args, "--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false"])


def test_predict_with_the_explanations_fragment_writes_every_sample(tmp_path) -> None:
    main(["predict", "--config", str(DATA_2D), "--config", str(BLACKBOX), "--config",
          str(CONFIGS / "predict" / "explanations.yaml"), "--trainer.callbacks.output_dir=explained",
          "--trainer.limit_predict_batches=1", "--trainer.enable_progress_bar=false"])
    rows = (tmp_path / "explained" / "index.csv").read_text().splitlines()[1:]
    assert rows and len(rows) == len(list((tmp_path / "explained").glob("*.npz")))


def test_unknown_key_fails_before_training_naming_the_key(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(DATA_2D), "--config", str(BLACKBOX), "--model.learning_rat=0.1"])
    assert "learning_rat" in capsys.readouterr().err


def test_wrong_type_fails_naming_the_key(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(DATA_2D), "--config", str(BLACKBOX), "--data.init_args.batch_size=many"])
    assert "batch_size" in capsys.readouterr().err


def printed_model(capsys, args: list[str]) -> dict:
    """The ``model`` section ``pellucid fit ... --print_config`` resolves."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(DATA_2D), *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)["model"]


def test_a_per_key_override_inside_a_nested_mapping_keeps_the_configs_other_keys(tmp_path, capsys) -> None:
    config = tmp_path / "narrow.yaml"
    config.write_text("model:\n  model: protopnet\n  model_kwargs:\n    backbone_kwargs: {channels: [8, 16, 32], "
                      "strides: [2, 2, 2]}\n    prototypes_per_class: 3\n")
    for override in (["--model.model_kwargs.backbone_kwargs.strides=[2,2,1]"],
                     ["--model.model_kwargs.backbone_kwargs.strides", "[2, 2, 1]"]):
        kwargs = printed_model(capsys, ["--config", str(config), *override])["model_kwargs"]
        assert kwargs == {"backbone_kwargs": {"channels": [8, 16, 32], "strides": [2, 2, 1]}, "prototypes_per_class": 3}
    # the model is built with both: the config's channels and the overridden strides
    cli = build_cli(["--config", str(DATA_2D), "--config", str(config), "--trainer.logger=false",
                     "--model.model_kwargs.backbone_kwargs.strides=[2, 2, 1]"], run=False)
    backbone = cli.model.model.backbone
    assert (backbone.out_channels, backbone.stride) == (32, 4)


def test_a_mapping_given_whole_merges_and_null_resets_it(tmp_path, capsys) -> None:
    config = tmp_path / "narrow.yaml"
    config.write_text("model:\n  model: protopnet\n  model_kwargs:\n    backbone_kwargs: {channels: [8, 16, 32]}\n")
    whole = '--model.model_kwargs.backbone_kwargs={"strides": [2, 2, 1]}'
    kwargs = printed_model(capsys, ["--config", str(config), whole])["model_kwargs"]
    assert kwargs["backbone_kwargs"] == {"channels": [8, 16, 32], "strides": [2, 2, 1]}
    reset = printed_model(capsys, ["--config", str(config), "--model.model_kwargs.backbone_kwargs=null", whole])
    assert reset["model_kwargs"]["backbone_kwargs"] == {"strides": [2, 2, 1]}


@pytest.mark.parametrize("mine_first", [True, False], ids=["mine-then-shipped", "shipped-then-mine"])
def test_layered_configs_merge_nested_model_options_in_both_orders(tmp_path, capsys, mine_first: bool) -> None:
    shipped = tmp_path / "shipped.yaml"
    shipped.write_text("model:\n  model: protopnet\n  model_kwargs:\n    backbone_kwargs: {channels: [16, 32, 64], "
                       "strides: [2, 2, 2]}\n    prototypes_per_class: 10\n"
                       "  loss_weights: {cluster: 0.8, l1: 1.0e-4}\n")
    mine = tmp_path / "mine.yaml"
    mine.write_text("model:\n  model_kwargs:\n    mask_guidance: true\n    backbone_kwargs: {strides: [2, 2, 1]}\n"
                    "  loss_weights: {mask_guidance: 20.0, cluster: 0.5}\n")
    order = [mine, shipped] if mine_first else [shipped, mine]
    model = printed_model(capsys, [arg for path in order for arg in ("--config", str(path))])
    later_strides = [2, 2, 2] if mine_first else [2, 2, 1]
    later_cluster = 0.8 if mine_first else 0.5
    assert model["model_kwargs"] == {"mask_guidance": True, "prototypes_per_class": 10,
                                     "backbone_kwargs": {"channels": [16, 32, 64], "strides": later_strides}}
    assert model["loss_weights"] == {"cluster": later_cluster, "l1": 1.0e-4, "mask_guidance": 20.0}


def test_merge_model_options_takes_overrides_out_and_appends_one_merged_value(tmp_path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  model: blackbox\n  model_kwargs: {backbone_kwargs: {channels: [8]}}\n")
    args, layers = merge_model_options(["--config", str(config), "--model.lr", "0.1",
                                        "--model.model_kwargs.backbone_kwargs.strides=[1]", "--model.group_lr.head",
                                        "1e-2", "--trainer.max_epochs=2"])
    assert args == ["--config", str(config), "--model.lr", "0.1", "--trainer.max_epochs=2",
                    '--model.model_kwargs={"backbone_kwargs": {"channels": [8], "strides": [1]}}',
                    '--model.group_lr={"head": 0.01}']
    assert layers.model == "blackbox"
    merged = deep_merge({"a": {"b": 1, "c": [1, 2]}, "e": {"f": 1}}, {"a": {"c": [3]}, "e": None})
    assert merged == {"a": {"b": 1, "c": [3]}, "e": None}


@pytest.mark.parametrize(("override", "path", "valid"), [
    ("--model.model_kwargs.prototypes_per_clas=3", "model.model_kwargs.prototypes_per_clas", "prototypes_per_class"),
    ("--model.model_kwargs.backbone_kwargs.chanels=[8]", "model.model_kwargs.backbone_kwargs.chanels",
     "act, channels, norm, strides"),
], ids=["top-level", "nested"])
def test_a_misspelled_model_option_is_a_usage_error_naming_the_model_key_and_valid_keys(
        tmp_path, capsys, override: str, path: str, valid: str) -> None:
    config = tmp_path / "p.yaml"
    config.write_text("model:\n  model: protopnet\n  model_kwargs: {backbone_kwargs: {channels: [8, 16]}}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(DATA_2D), "--config", str(config), override, "--trainer.fast_dev_run=true"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"model 'protopnet': unknown option '{path}'" in error and valid in error
    assert "Traceback" not in error


def test_an_unknown_model_name_is_a_usage_error_listing_the_registered_ones(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(DATA_2D), "--config", str(BLACKBOX), "--model.model=protopnt", "--print_config"])
    assert exit_info.value.code == 2
    assert "model.model: unknown model 'protopnt'; registered models: " in capsys.readouterr().err


def test_options_left_from_another_backbone_fail_at_parse_time_and_null_resets_them(capsys) -> None:
    resnet = ["--model.model_kwargs.backbone=monai/resnet10",
              "--model.model_kwargs.backbone_kwargs.widths=[8, 8, 16, 16]"]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(DATA_2D), "--config", str(BLACKBOX), *resnet, "--print_config"])
    assert exit_info.value.code == 2  # blackbox.yaml's convnet channels/strides are not ResNet options
    error = capsys.readouterr().err
    assert "unknown option 'model.model_kwargs.backbone_kwargs.channels'; valid keys of " \
           "model.model_kwargs.backbone_kwargs (backbone 'monai/resnet10'): first_stride, max_pool, widths" in error
    model = printed_model(capsys, ["--config", str(BLACKBOX), "--model.model_kwargs.backbone_kwargs=null", *resnet])
    assert model["model_kwargs"] == {"backbone": "monai/resnet10", "backbone_kwargs": {"widths": [8, 8, 16, 16]}}


def test_zoo_lists_registered_models_via_the_console_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "pellucid.training.cli", "zoo"], capture_output=True, text=True,
                            check=True)
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["model", "description"]
    assert any(line.startswith("blackbox ") and "Black-box baseline" in line for line in lines)
