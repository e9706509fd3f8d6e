"""The data facts a checkpoint fixes: ``validate``, ``test`` and ``predict --ckpt_path`` serve the checkpoint's model.

The CLI links the data module's facts (``spatial_dims``, ``in_channels``, ``num_classes``, ``task``, ``class_names``,
``concepts``) into the model's constructor. For ``fit`` that is right. For a command that loads a checkpoint it is not:
the data at hand (a manifest without labels, with a subset of the classes, or with other names) would decide how many
classes the model has and what they are called. So, with ``--ckpt_path``:

1. before anything is instantiated, the data module gets the checkpoint's class names (when it takes
   ``class_names``): labels are read as the checkpoint's class indices, a manifest without labels or with a subset of
   the classes reads fine, and a label the checkpoint does not know is a ``ManifestError`` naming the row, the label
   and the checkpoint's classes. A ``spatial_dims`` or ``in_channels`` of the data that disagrees with the
   checkpoint's is a usage error (the images would not fit the model);
2. after, the model is rebuilt with the checkpoint's facts where the data's differ (the rest of its configuration
   kept), so ``num_classes``, ``class_names`` and ``concepts`` come from the checkpoint, never from the data.

The checkpoint is read with ``torch.load(weights_only=True)`` (:func:`~pellucid.training.checkpoint.read_checkpoint`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pellucid.training.checkpoint import module_arguments
from pellucid.training.module import InterpretableModule

CHECKPOINT_SUBCOMMANDS = ("validate", "test", "predict")
DATA_FACTS = ("spatial_dims", "in_channels", "num_classes", "task", "class_names", "concepts")
READ_FROM_DATA = ("spatial_dims", "in_channels")  # how the data reads images: it must agree, it is not overridden


def checkpoint_facts(checkpoint: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The data facts in a checkpoint's hyper-parameters.

    Args:
        checkpoint: The checkpoint as :func:`~pellucid.training.checkpoint.read_checkpoint` loaded it; ``None`` (no
            file: Lightning's ``"last"``, ``"best"``, a URL, which Lightning resolves itself) gives ``None``.
    """
    if checkpoint is None:
        return None
    hparams = checkpoint.get(InterpretableModule.CHECKPOINT_HYPER_PARAMS_KEY)
    if not isinstance(hparams, Mapping):
        return None
    return {key: hparams[key] for key in DATA_FACTS if key in hparams}


def give_data_the_checkpoint_classes(data_config: Any, facts: Mapping[str, Any], checkpoint: str | Path) -> str | None:
    """Set the data's ``class_names`` to the checkpoint's (step 1 of the module docstring); return a problem, if any.

    Args:
        data_config: The parsed ``data`` section (``class_path`` and ``init_args``), changed in place.
        facts: :func:`checkpoint_facts`.
        checkpoint: The checkpoint's path, for the message.

    Returns:
        ``None``, or one line naming the data argument that disagrees with the checkpoint, both values and the fix.
    """
    init_args = data_config.get("init_args") if data_config is not None else None
    if init_args is None:
        return None
    for key in READ_FROM_DATA:
        if key in init_args and key in facts and init_args[key] is not None and init_args[key] != facts[key]:
            return (f"data.init_args.{key} is {init_args[key]}, but checkpoint {checkpoint} was trained with "
                    f"{key}={facts[key]}: set --data.init_args.{key}={facts[key]}, or use a checkpoint trained for "
                    "this data")
    names = facts.get("class_names")
    if "class_names" in init_args and names and facts.get("task", "multiclass") == "multiclass":
        init_args["class_names"] = list(names)
    return None


def module_for_checkpoint(module: InterpretableModule, facts: Mapping[str, Any]) -> InterpretableModule:
    """``module`` as configured, with the checkpoint's data facts: itself when they agree, else a rebuilt module.

    Step 2 of the module docstring; the weights come from the checkpoint when Lightning loads it.
    """
    if all(module.hparams.get(key) == value for key, value in facts.items()):
        return module
    accepted = module_arguments()
    configured = {key: value for key, value in module.hparams.items() if key in accepted}
    return type(module)(**{**configured, **facts})
