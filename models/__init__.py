"""pellucid.models: transparent-by-design architectures as plain ``torch.nn.Module``s.

Importing this package registers every architecture in the zoo.
"""

# Importing a model module registers its architectures.
from pellucid.models import attention_classifier as _attention_classifier  # noqa: F401
from pellucid.models import attention_unet as _attention_unet  # noqa: F401
from pellucid.models import blackbox as _blackbox  # noqa: F401
from pellucid.models import cem as _cem  # noqa: F401
from pellucid.models import concept_bottleneck as _concept_bottleneck  # noqa: F401
from pellucid.models import protopnet as _protopnet  # noqa: F401
from pellucid.models import xprotonet as _xprotonet  # noqa: F401
from pellucid.models.backbones import Backbone, create_backbone
from pellucid.models.base import InputError, InterpretableModel, check_parameter_groups, classification_loss
from pellucid.models.concepts import ConceptSpec
from pellucid.models.output import ModelOutput, OutputContractError, validate_output
from pellucid.models.registry import ModelSpec, UnknownModelError, create_model, list_models, register_model

__all__ = [
    "Backbone",
    "ConceptSpec",
    "InputError",
    "InterpretableModel",
    "ModelOutput",
    "ModelSpec",
    "OutputContractError",
    "UnknownModelError",
    "check_parameter_groups",
    "classification_loss",
    "create_backbone",
    "create_model",
    "list_models",
    "register_model",
    "validate_output",
]
