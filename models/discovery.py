"""Finding models: the zoo's own modules, and other packages' models through the entry-point group ``pellucid.models``.

Adding an architecture to the zoo is one file in ``models/`` (with ``@register_model`` builders) and one YAML in
``configs/model/``: :func:`import_submodules` imports every public module of the package, and importing a module runs
its ``@register_model`` decorators. Modules that register nothing (the base, the output, backbones, recipes, options
...) are the infrastructure: they import as cheaply either way, so nothing lists them.

Another package adds architectures without touching pellucid by declaring an entry point in the group
``pellucid.models`` (see ``docs/adding_a_model.md``)::

    [options.entry_points]
    pellucid.models =
        my_models = my_package.models            # a module: importing it registers
        more = my_package.zoo:register_all       # a callable: calling it registers

:func:`load_entry_points` loads them; the registry calls it once, at the first ``list_models`` / ``create_model``.
Errors are never swallowed: a model module that fails to import fails the import of ``pellucid.models``, and a
failing entry point raises :class:`EntryPointError` naming the entry point and its package.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType

ENTRY_POINT_GROUP = "pellucid.models"


class EntryPointError(RuntimeError):
    """An entry point of the group ``pellucid.models`` failed to load or to register its models."""


def import_submodules(package: ModuleType) -> list[str]:
    """Import every public module of ``package`` and of its sub-packages, depth first, in name order.

    Private modules and packages (``_name``) are skipped. An error raised while importing a module propagates
    unchanged: a broken model file is never silently left out of the zoo.

    Args:
        package: An imported package (``pellucid.models``).

    Returns:
        The full names of the modules imported (or found already imported).
    """
    imported: list[str] = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda found: found.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        imported.append(module.__name__)
        if info.ispkg:
            imported += import_submodules(module)
    return imported


def _package_of(entry_point: EntryPoint) -> str:
    """The distribution that declares ``entry_point`` (``name version``), or ``an unknown package``."""
    dist = getattr(entry_point, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "an unknown package"


def load_entry_point(entry_point: EntryPoint) -> None:
    """Load one entry point: import a module (importing registers) or call a callable (calling registers).

    Raises:
        EntryPointError: naming the entry point, its value, its package and the original error.
    """
    try:
        loaded = entry_point.load()
        if not isinstance(loaded, ModuleType):
            if not callable(loaded):
                raise TypeError(f"expected a module or a callable, got a {type(loaded).__name__}")
            loaded()
    except Exception as error:
        raise EntryPointError(
            f"entry point {entry_point.name!r} = {entry_point.value!r} of {_package_of(entry_point)} in group "
            f"{entry_point.group!r} failed: {type(error).__name__}: {error}; fix or uninstall that package"
        ) from error


def load_entry_points(group: str = ENTRY_POINT_GROUP) -> list[str]:
    """Load every entry point of ``group``, in name order; returns their names.

    Raises:
        EntryPointError: for the first entry point that fails (see :func:`load_entry_point`).
    """
    found = sorted(entry_points(group=group), key=lambda entry_point: entry_point.name)
    for entry_point in found:
        load_entry_point(entry_point)
    return [entry_point.name for entry_point in found]
