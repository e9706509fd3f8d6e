"""Load a Lightning checkpoint of an :class:`InterpretableModule` without running code from the file.

``torch.load(weights_only=False)`` unpickles: a checkpoint file can then run any code it names. pellucid's own
checkpoints hold only tensors and plain containers (the module stores its hyper-parameters as strings, numbers, lists
and dicts; concept specifications as dicts), so they load with ``weights_only=True``, and the module is rebuilt from
the checkpoint's hyper-parameters: registry name and arguments, data facts, classes, concepts.

- :func:`read_checkpoint`: the checkpoint's content, or a :class:`CheckpointError` naming the file when it needs
  unpickling code (a pickled custom object) or is not a checkpoint at all;
- :func:`load_checkpoint`: the rebuilt module, on the CPU, with its weights.
"""

from __future__ import annotations

import inspect
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from pellucid.training.module import InterpretableModule

_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


class CheckpointError(ValueError):
    """A checkpoint file that pellucid refuses: it needs unpickling code, or is not an InterpretableModule's."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The content of a Lightning checkpoint, loaded with ``torch.load(weights_only=True)`` on the CPU.

    Only tensors, numbers, strings and plain containers are rebuilt; nothing the file names is imported or called.

    Args:
        path: The ``.ckpt`` file.

    Returns:
        The checkpoint dict (``state_dict``, ``hyper_parameters``, ...).

    Raises:
        FileNotFoundError: naming the path when there is no such file.
        CheckpointError: naming the file when loading it would need unpickling code (and which object), when it is
            not a torch file, or when it has no ``state_dict``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        message = str(error)
        found = _UNSUPPORTED_GLOBAL.search(message)
        if found is None and "weights_only" not in message:
            raise CheckpointError(f"checkpoint {str(path)!r} is not a readable torch checkpoint: {error}") from None
        what = f"an object of {found.group(1)}" if found else "content other than tensors and plain containers"
        raise CheckpointError(
            f"refusing to load checkpoint {str(path)!r}: it holds {what}, which only unpickling code can rebuild, "
            "and pellucid never runs code from a checkpoint file (it loads with torch.load(weights_only=True)); "
            "save checkpoints whose hyper-parameters and state are tensors, numbers, strings, lists and dicts"
        ) from None
    except Exception as error:  # a truncated zip, a text file ...: torch raises RuntimeError, KeyError, EOFError
        raise CheckpointError(f"checkpoint {str(path)!r} is not a readable torch checkpoint "
                              f"({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"checkpoint {str(path)!r} is not a Lightning checkpoint: it has no 'state_dict'")
    return checkpoint


def load_checkpoint(path: str | Path) -> InterpretableModule:
    """Rebuild the :class:`InterpretableModule` a Lightning checkpoint was saved from, on the CPU, with its weights.

    The module is constructed from the checkpoint's ``hyper_parameters`` (the registry name and arguments it records);
    private entries such as LightningCLI's ``_instantiator`` are ignored, exactly as Lightning's own loading ignores
    them, so no class or function named by the file is ever imported.

    Args:
        path: The ``.ckpt`` file.

    Raises:
        FileNotFoundError: naming the path when there is no such file.
        CheckpointError: naming the file when it needs unpickling code, is not a checkpoint of an
            ``InterpretableModule``, or names hyper-parameters the module does not take.
    """
    checkpoint = read_checkpoint(path)
    hparams = checkpoint.get(InterpretableModule.CHECKPOINT_HYPER_PARAMS_KEY)
    if not isinstance(hparams, dict) or not isinstance(hparams.get("model"), str):
        raise CheckpointError(f"checkpoint {str(path)!r} is not an InterpretableModule checkpoint: its "
                              "hyper-parameters do not name a registered model")
    accepted = module_arguments()
    unknown = sorted(k for k in hparams if k not in accepted and not str(k).startswith("_"))
    if unknown:
        raise CheckpointError(f"checkpoint {str(path)!r}: hyper-parameter(s) {unknown} are not arguments of "
                              f"InterpretableModule (it takes {sorted(accepted)})")
    module = InterpretableModule(**{k: v for k, v in hparams.items() if k in accepted})
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    return module


def module_arguments() -> set[str]:
    """The names ``InterpretableModule`` takes (hyper-parameters outside them are not its arguments)."""
    return set(inspect.signature(InterpretableModule.__init__).parameters) - {"self"}
