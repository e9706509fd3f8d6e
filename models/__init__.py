"""pellucid.models: transparent-by-design architectures as plain ``torch.nn.Module``s.

Importing this package registers every architecture in the zoo: every public module of the package is imported
(:mod:`pellucid.models.discovery`), so a new model file needs no line here. Other packages' models, declared through
the entry-point group ``pellucid.models``, are loaded at the first ``list_models`` / ``create_model``.
"""

from __future__ import annotations

import sys

# The public names are bound before the model modules are imported, so a model module may import them from here.
from pellucid.models.backbones import Backbone, create_backbone
from pellucid.models.base import InputError, InterpretableModel, check_parameter_groups, classification_loss
from pellucid.models.concepts import ConceptSpec
from pellucid.models.discovery import ENTRY_POINT_GROUP, EntryPointError, import_submodules
from pellucid.models.options import ModelOptionError
from pellucid.models.output import ModelOutput, OutputContractError, validate_output
from pellucid.models.pretrained import BundleError, list_bundles, load_pretrained
from pellucid.models.prototype_corrections import Corrections, CorrectionsError, read_corrections, write_corrections
from pellucid.models.registry import (
    ModelSpec,
    UnknownModelError,
    create_model,
    expected_parameters,
    list_models,
    register_model,
)

import_submodules(sys.modules[__name__])  # importing a model module registers its architectures

__all__ = [
    "ENTRY_POINT_GROUP",
    "Backbone",
    "BundleError",
    "ConceptSpec",
    "Corrections",
    "CorrectionsError",
    "EntryPointError",
    "InputError",
    "InterpretableModel",
    "ModelOptionError",
    "ModelOutput",
    "ModelSpec",
    "OutputContractError",
    "UnknownModelError",
    "check_parameter_groups",
    "classification_loss",
    "create_backbone",
    "create_model",
    "expected_parameters",
    "list_bundles",
    "list_models",
    "load_pretrained",
    "read_corrections",
    "register_model",
    "validate_output",
    "write_corrections",
]
