"""The configs pellucid ships, by name, from a checkout or an installed package.

The shipped YAML files live in ``configs/`` of the checkout; ``setup.cfg`` installs the same tree as
``pellucid/configs`` beside the ``models`` and ``training`` packages, so a user of a regular install reaches them by
name: ``zoo:protopnet_phantom2d`` (the experiment that built the bundle of that name), ``zoo:protopnet`` (the model
fragment), ``zoo:phantom2d`` (the data), or with the folder, ``zoo:model/protopnet``. A name is a file's stem, unique
across the folders (a test keeps it so); a folder-qualified name always works.

``pellucid config`` lists them with their one-line purpose, ``pellucid config <name>`` prints one (to copy and edit),
and every ``pellucid`` argument of the form ``zoo:<name>`` (or ``--flag=zoo:<name>``) is replaced by the file's path
before the command parses it (:func:`expand_config_names`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

PREFIX = "zoo:"


class ConfigNameError(ValueError):
    """A ``zoo:<name>`` that names no shipped config, or more than one."""


def shipped_configs_dir() -> Path:
    """``configs/`` of the checkout or ``pellucid/configs`` of an installed package (the folder beside ``training``)."""
    return Path(__file__).resolve().parents[1] / "configs"


def list_configs() -> dict[str, Path]:
    """Folder-qualified name (``model/protopnet``) -> file, for every shipped YAML config, sorted."""
    root = shipped_configs_dir()
    if not root.is_dir():
        return {}
    return {path.relative_to(root).with_suffix("").as_posix(): path for path in sorted(root.rglob("*.yaml"))}


def purpose(path: Path) -> str:
    """The config's first comment line: what it is."""
    first = path.read_text().splitlines()[:1]
    return first[0].lstrip("#").strip() if first and first[0].startswith("#") else ""


def resolve_config(name: str) -> Path:
    """The shipped config ``name`` (with or without ``zoo:``, with or without its folder and ``.yaml``).

    Raises:
        ConfigNameError: naming the name, what matched and the way to list them.
    """
    key = name.removeprefix(PREFIX).removesuffix(".yaml")
    configs = list_configs()
    if key in configs:
        return configs[key]
    matches = [qualified for qualified in configs if qualified.rsplit("/", 1)[-1] == key]
    if len(matches) == 1:
        return configs[matches[0]]
    if matches:
        raise ConfigNameError(f"config name {name!r} is ambiguous: {', '.join(matches)}; give the folder, "
                              f"e.g. {PREFIX}{matches[0]}")
    raise ConfigNameError(f"no shipped config {name!r} in {shipped_configs_dir()}; `pellucid config` lists them "
                          f"({len(configs)} shipped), or pass the path of a YAML file")


def expand_config_names(args: list[str]) -> list[str]:
    """``args`` with each ``zoo:<name>`` and ``--flag=zoo:<name>`` replaced by the shipped file's path."""
    expanded = []
    for arg in args:
        flag, equals, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        if value.startswith(PREFIX):
            path = str(resolve_config(value))
            arg = f"{flag}={path}" if equals else path
        expanded.append(arg)
    return expanded


def config_main(args: list[str]) -> None:
    """``pellucid config [name]``: list the shipped configs, or print one."""
    parser = argparse.ArgumentParser(prog="pellucid config",
                                     description="list the shipped configs, or print one to copy and edit")
    parser.add_argument("name", nargs="?", help="a config name (protopnet_phantom2d, model/protopnet, ...)")
    options = parser.parse_args(args)
    if options.name:
        print(resolve_config(options.name).read_text(), end="")
        return
    configs = list_configs()
    width = max((len(name) for name in configs), default=0) + len(PREFIX)
    print(f"{len(configs)} shipped config(s) in {shipped_configs_dir()}; pass one as --config {PREFIX}<name>:")
    for qualified, path in configs.items():
        print(f"  {PREFIX + qualified:<{width}}  {purpose(path)}")
