"""What a regular (non-editable) install needs: shipped configs by name, bundles found beside the code, --version.

The install itself (wheel, fresh venv, user commands outside the checkout) is `.ci/check_install`; these tests pin
the pieces it relies on, fast.
"""

from __future__ import annotations

import configparser
import fnmatch
import importlib.metadata
from pathlib import Path

import pytest

from pellucid.models.pretrained import (
    BundleError,
    checkpoints_dir,
    list_bundles,
    resolve_bundle,
    shipped_checkpoints_dir,
)
from pellucid.training.cli import main
from pellucid.training.shipped_configs import (
    ConfigNameError,
    expand_config_names,
    list_configs,
    resolve_config,
    shipped_configs_dir,
)

ROOT = Path(__file__).resolve().parents[1]


def package_data() -> dict[str, list[str]]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return {key: value.split() for key, value in parser["options.package_data"].items()}


@pytest.mark.parametrize(("package", "folder"), [("pellucid.checkpoints", "checkpoints"),
                                                 ("pellucid.configs", "configs")])
def test_the_package_data_globs_cover_every_shipped_file(package: str, folder: str) -> None:
    patterns = package_data()[package]
    files = [p.relative_to(ROOT / folder).as_posix() for p in (ROOT / folder).rglob("*") if p.is_file()]
    assert files
    missed = [f for f in files if "__pycache__" not in f and not any(fnmatch.fnmatch(f, pat) for pat in patterns)]
    assert not missed, f"{missed} would not travel in the wheel; widen [options.package_data] {package}"


def test_the_shipped_folders_sit_beside_the_code_as_in_an_installed_package() -> None:
    assert shipped_checkpoints_dir() == ROOT / "checkpoints"
    assert shipped_configs_dir() == ROOT / "configs"


def test_every_config_has_a_unique_short_name_a_purpose_line_and_every_bundle_its_experiment() -> None:
    configs = list_configs()
    stems = [name.rsplit("/", 1)[-1] for name in configs]
    assert len(stems) == len(set(stems)), sorted(s for s in stems if stems.count(s) > 1)
    for name, path in configs.items():
        assert path.read_text().startswith("# "), f"{name}: the first line says what the config is"
    for bundle in list_bundles():
        if bundle.parent == shipped_checkpoints_dir():
            assert resolve_config(bundle.name) == ROOT / "configs" / "experiments" / f"{bundle.name}.yaml"


def test_config_names_resolve_by_stem_folder_and_suffix_and_unknown_names_are_refused() -> None:
    expected = ROOT / "configs" / "model" / "protopnet.yaml"
    assert resolve_config("zoo:protopnet") == resolve_config("model/protopnet") == expected
    assert resolve_config("protopnet.yaml") == expected
    with pytest.raises(ConfigNameError, match=r"no shipped config 'zoo:protopnett'.*`pellucid config` lists them"):
        resolve_config("zoo:protopnett")
    assert expand_config_names(["fit", "--config", "zoo:protopnet", "--config=zoo:phantom2d", "--x=zoo", "a.yaml"]) \
        == ["fit", "--config", str(expected), f"--config={ROOT / 'configs' / 'data' / 'phantom2d.yaml'}",
            "--x=zoo", "a.yaml"]


def test_the_command_prints_its_version_lists_and_prints_configs_and_names_a_bad_one(capsys) -> None:
    main(["--version"])
    assert capsys.readouterr().out == f"pellucid {importlib.metadata.version('pellucid')}\n"
    main(["config"])
    listing = capsys.readouterr().out
    assert "zoo:experiments/protopnet_phantom2d" in listing and "zoo:data/phantom2d" in listing
    main(["config", "phantom2d"])
    assert capsys.readouterr().out == (ROOT / "configs" / "data" / "phantom2d.yaml").read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "zoo:nope"])
    assert exit_info.value.code == 1
    assert "pellucid: error: no shipped config 'zoo:nope'" in capsys.readouterr().err


def test_the_users_bundle_folders_add_to_the_shipped_ones_and_hide_a_shipped_name(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("PELLUCID_CHECKPOINTS", raising=False)
    shipped = [b.name for b in list_bundles()]
    assert "protopnet_phantom2d" in shipped and checkpoints_dir() == Path("checkpoints")
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    for folder, name in ((mine, "protopnet_phantom2d"), (theirs, "own_model")):
        (folder / name).mkdir(parents=True)
        (folder / name / "metadata.json").write_text("{}")
    monkeypatch.setenv("PELLUCID_CHECKPOINTS", f"{mine}:{theirs}")
    names = [b.name for b in list_bundles()]
    assert set(shipped) <= set(names) and "own_model" in names
    assert resolve_bundle("protopnet_phantom2d") == mine / "protopnet_phantom2d"
    assert resolve_bundle("own_model") == theirs / "own_model"
    assert checkpoints_dir() == mine  # where `pellucid export` writes by default
    with pytest.raises(BundleError, match=rf"not in {mine}, {theirs}, {shipped_checkpoints_dir()}"):
        resolve_bundle("nothing_here")
