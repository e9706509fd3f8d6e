"""The registry: decorator, factory, listing, declared parameter counts, module discovery and entry points."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from test_external_model import write_distribution

import pellucid.models
from pellucid.models import (
    EntryPointError,
    UnknownModelError,
    create_model,
    expected_parameters,
    list_models,
    register_model,
)
from pellucid.models import registry as registry_module
from pellucid.models.blackbox import BlackBox
from pellucid.models.discovery import import_submodules, load_entry_points


@pytest.fixture()
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))


def test_register_create_and_list(clean_registry: None) -> None:
    seen = {}

    @register_model
    def toy_model(spatial_dims: int, in_channels: int = 1, num_classes: int = 2, dropout: float = 0.25):
        seen.update(dropout=dropout)
        return BlackBox(spatial_dims, in_channels, num_classes, dropout=dropout)

    assert "toy_model" in list_models() and list_models("toy") == ["toy_model"]
    model = create_model("toy_model", 2, num_classes=4, dropout=None)  # None is dropped: builder default applies
    assert seen["dropout"] == 0.25
    assert model.model_spec.name == "toy_model"
    assert model.model_spec.kwargs == {"spatial_dims": 2, "num_classes": 4}
    assert model.num_classes == 4 and model.name == "toy_model"


def test_duplicate_and_bad_builders_are_refused(clean_registry: None) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model(registry_module._REGISTRY["blackbox"])

    def no_dims(in_channels: int):
        return None

    with pytest.raises(ValueError, match="first parameter must be 'spatial_dims'"):
        register_model(no_dims)


def test_unknown_model_lists_registered_ones() -> None:
    with pytest.raises(UnknownModelError, match=r"unknown model 'nope'; registered models: .*blackbox"):
        create_model("nope", 2)


def test_spatial_dims_is_validated() -> None:
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3, got 4"):
        create_model("blackbox", 4)


# ------------------------------------------------------------------------------------------ declared parameter counts
def test_register_model_with_arguments_records_the_declared_parameter_count(clean_registry: None) -> None:
    @register_model(expected_parameters={2: 10, 3: 20})
    def counted_model(spatial_dims: int, **kwargs):
        return BlackBox(spatial_dims, **kwargs)

    @register_model
    def uncounted_model(spatial_dims: int, **kwargs):
        return BlackBox(spatial_dims, **kwargs)

    assert counted_model.__name__ == "counted_model" and {"counted_model", "uncounted_model"} <= set(list_models())
    assert expected_parameters("counted_model") == {2: 10, 3: 20}
    assert expected_parameters("uncounted_model") == {}
    assert expected_parameters("blackbox") == {2: 95_731, 3: 285_235}  # declared in models/blackbox.py


@pytest.mark.parametrize("counts", [{4: 10}, {2: 0}, {2: 1.5}, {3: True}])
def test_a_malformed_parameter_count_is_refused_naming_it(clean_registry: None, counts: dict) -> None:
    with pytest.raises(ValueError, match=r"expected_parameters maps spatial_dims 2 or 3 to a positive parameter count"):
        @register_model(expected_parameters=counts)
        def badly_counted(spatial_dims: int):
            return None
    assert "badly_counted" not in list_models()


# ---------------------------------------------------------------------------------------------- module discovery
def test_every_public_module_of_pellucid_models_is_imported_and_the_model_modules_are_known() -> None:
    folder = Path(pellucid.models.__file__).parent
    public = {f"pellucid.models.{p.stem}" for p in folder.glob("*.py") if not p.stem.startswith("_")}
    assert public <= set(sys.modules), sorted(public - set(sys.modules))
    modules = {builder.__module__ for builder in registry_module._REGISTRY.values()}
    assert {"pellucid.models.blackbox", "pellucid.models.protopnet", "pellucid.models.attention_unet"} <= set(modules)
    assert not {"pellucid.models.base", "pellucid.models.registry", "pellucid.models.discovery"} & set(modules)


def test_importing_pellucid_models_imports_no_training_code() -> None:
    code = "import sys, pellucid.models; print(sorted(m for m in sys.modules if m.startswith('pellucid.training')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def write_package(root: Path, name: str, files: dict[str, str]) -> None:
    """A package ``name`` under ``root``: ``files`` maps a relative path (``sub/x.py``) to its source."""
    for relative, source in {"__init__.py": "", **files}.items():
        path = root / name / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)


def test_discovery_imports_public_modules_and_subpackages_and_skips_private_ones(tmp_path, monkeypatch) -> None:
    write_package(tmp_path, "fakezoo_ok", {"b.py": "", "a.py": "", "_private.py": "raise RuntimeError('imported')",
                                           "sub/__init__.py": "", "sub/c.py": ""})
    monkeypatch.syspath_prepend(str(tmp_path))
    imported = import_submodules(importlib.import_module("fakezoo_ok"))
    assert imported == ["fakezoo_ok.a", "fakezoo_ok.b", "fakezoo_ok.sub", "fakezoo_ok.sub.c"]
    assert "fakezoo_ok._private" not in sys.modules


@pytest.mark.parametrize("broken", ["import no_such_dependency_xyz", "raise ValueError('bad model file')"])
def test_an_error_inside_a_model_module_propagates(tmp_path, monkeypatch, broken: str) -> None:
    name = f"fakezoo_broken_{len(broken)}"
    write_package(tmp_path, name, {"good.py": "", "sub/__init__.py": "", "sub/broken.py": broken})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises((ModuleNotFoundError, ValueError), match="no_such_dependency_xyz|bad model file"):
        import_submodules(importlib.import_module(name))


# -------------------------------------------------------------------------------------------------- entry points
PLUGIN = '''
from pellucid.models import register_model
from pellucid.models.blackbox import BlackBox

def {name}(spatial_dims: int, **kwargs):
    """A plugin model."""
    return BlackBox(spatial_dims, **kwargs)

def register_all():
    register_model({name})
'''


@pytest.fixture()
def fresh_entry_points(clean_registry: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry as if no entry point had been loaded yet."""
    monkeypatch.setattr(registry_module, "_ENTRY_POINTS", {"loaded": False, "error": None})


def test_a_module_and_a_callable_entry_point_register_at_the_first_look_up(tmp_path, monkeypatch,
                                                                         fresh_entry_points: None) -> None:
    module_source = PLUGIN.format(name="plugin_by_module") + "\nregister_all()\n"
    write_distribution(tmp_path, "pellucid-plugin-a", {"by_module": "plugin_a_models"},
                       {"plugin_a_models.py": module_source})
    write_distribution(tmp_path, "pellucid-plugin-b", {"by_callable": "plugin_b_models:register_all"},
                       {"plugin_b_models.py": PLUGIN.format(name="plugin_by_callable")})
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "plugin_by_module" not in registry_module._REGISTRY  # nothing loaded before the first look-up
    assert {"plugin_by_module", "plugin_by_callable"} <= set(list_models())
    model = create_model("plugin_by_callable", 2, num_classes=2)
    assert model.name == "plugin_by_callable" and model.num_classes == 2
    list_models()  # loaded once: a second load would register the same names again and raise


def test_a_failing_entry_point_names_itself_and_its_package(tmp_path, monkeypatch, fresh_entry_points: None) -> None:
    write_distribution(tmp_path, "pellucid-broken-plugin", {"broken": "plugin_c_models:register_all"},
                       {"plugin_c_models.py": "def register_all():\n    raise RuntimeError('no weights here')\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    pattern = (r"entry point 'broken' = 'plugin_c_models:register_all' of pellucid-broken-plugin 0\.1 in group "
               r"'pellucid\.models' failed: RuntimeError: no weights here")
    with pytest.raises(EntryPointError, match=pattern):
        list_models()
    with pytest.raises(EntryPointError, match=pattern):  # raised again, never a silently partial registry
        create_model("blackbox", 2)


def test_an_entry_point_that_is_neither_module_nor_callable_is_refused(tmp_path, monkeypatch) -> None:
    write_distribution(tmp_path, "pellucid-odd-plugin", {"odd": "plugin_d_models:NUMBER"},
                       {"plugin_d_models.py": "NUMBER = 3\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(EntryPointError, match=r"'odd'.*pellucid-odd-plugin.*expected a module or a callable, got"):
        load_entry_points()
