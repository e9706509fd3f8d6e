"""Every shipped config runs `fit` through the real CLI (fast_dev_run), and the CLI fails early on bad configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pellucid.training.cli import build_cli, main, nested_override_problems

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


def test_a_per_key_override_inside_a_nested_mapping_is_refused_before_it_drops_keys(tmp_path, capsys) -> None:
    config = tmp_path / "narrow.yaml"
    config.write_text(BLACKBOX.read_text().replace("channels: [16, 32, 64]", "channels: [8, 16, 32]"))
    assert "channels: [8, 16, 32]" in config.read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(DATA_2D), "--config", str(config),
              "--model.model_kwargs.backbone_kwargs.strides=[2, 2, 1]"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "--model.model_kwargs.backbone_kwargs.strides would replace the whole model.model_kwargs.backbone_kwargs" \
        in error and '--model.model_kwargs.backbone_kwargs="{strides: ...' in error
    # one level in, and the mapping passed whole, are applied as written
    assert nested_override_problems(["fit", "--model.model_kwargs.prototypes_per_class=5", "--model.lr", "0.1",
                                     '--model.model_kwargs.backbone_kwargs={"strides": [2, 2, 1]}']) == []
    cli = build_cli(["--config", str(DATA_2D), "--config", str(config), "--trainer.logger=false",
                     "--model.model_kwargs.backbone_kwargs={channels: [8, 16, 32], strides: [2, 2, 1]}"], run=False)
    backbone = cli.model.model.backbone
    assert (backbone.out_channels, backbone.stride) == (32, 4)


def test_zoo_lists_registered_models_via_the_console_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "pellucid.training.cli", "zoo"], capture_output=True, text=True,
                            check=True)
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["model", "description"]
    assert any(line.startswith("blackbox ") and "Black-box baseline" in line for line in lines)
