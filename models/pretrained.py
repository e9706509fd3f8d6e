"""Provided checkpoints ("bundles"): find, verify and load them without unpickling anything.

A bundle is a folder ``checkpoints/<name>/`` in the spirit of a MONAI bundle:

- ``weights.safetensors``: the model's tensors (safetensors: no code runs on load);
- ``metadata.json``: model name and version, how to build it (registry name and arguments), spatial dims, input
  spec (channels, spacing, intensity normalisation), classes, concepts with units, non-tensor model state (e.g.
  prototype provenance), training data and config, measured metrics, and the sha256 of the weights file;
- ``config.yaml``: the training config that produced it;
- ``README.md``: the model card;
- ``SHA256SUMS``: the sha256 of every other file of the bundle, one ``<hex>  <file name>`` line each (the format
  ``sha256sum -c`` reads).

``load_pretrained(name or path)`` (and ``--init_from``) checks every file against ``SHA256SUMS`` and refuses a bundle
with a changed, missing or unlisted file, so an edited ``metadata.json`` (class names, provenance, metrics,
interpolation) is refused as a changed weights file is. The file detects edits and corruption; it is no signature:
whoever rewrites it vouches for the bundle. A bundle written before ``SHA256SUMS`` existed gets one with
``python -m pellucid.training.bundle <bundle folder>...`` (after checking the bundle is the one you expect).

``hf://<owner>/<repo>[@<revision>]`` names a bundle on the Hugging Face Hub, downloaded into (or, offline, found in)
the Hugging Face cache and verified the same way (:mod:`pellucid.models.hub`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import nn

from pellucid.models.concepts import as_concept_spec
from pellucid.models.registry import create_model, model_builder

BUNDLE_FORMAT = 1
WEIGHTS_FILE, METADATA_FILE, CHECKSUMS_FILE = "weights.safetensors", "metadata.json", "SHA256SUMS"
HASH_COMMAND = "python -m pellucid.training.bundle"


class BundleError(ValueError):
    """A bundle is missing, incomplete, tampered with or of another model than expected."""


def shipped_checkpoints_dir() -> Path:
    """The bundles pellucid ships: ``checkpoints/`` of the checkout, or ``pellucid/checkpoints`` of an installed wheel.

    Both are the folder beside the ``models`` package (``setup.cfg`` installs ``checkpoints/`` as package data there).
    """
    return Path(__file__).resolve().parents[1] / "checkpoints"


def user_checkpoints_dirs() -> list[Path]:
    """The folders of the user's own bundles: ``$PELLUCID_CHECKPOINTS`` (several joined with ``os.pathsep``)."""
    configured = os.environ.get("PELLUCID_CHECKPOINTS", "")
    return [Path(part) for part in configured.split(os.pathsep) if part]


def checkpoints_dirs() -> list[Path]:
    """Where named bundles are looked up, first match wins: the user's folders, then the shipped bundles."""
    return [*user_checkpoints_dirs(), shipped_checkpoints_dir()]


def checkpoints_dir() -> Path:
    """Where a new bundle is exported by default: the first ``$PELLUCID_CHECKPOINTS`` folder, else ``./checkpoints``.

    In the checkout ``./checkpoints`` is the shipped folder (``benchmarks/build_zoo.py`` writes there); an installed
    package never writes into its own files.
    """
    users = user_checkpoints_dirs()
    return users[0] if users else Path("checkpoints")


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_bundle(name_or_path: str | Path) -> Path:
    """A bundle folder from a zoo name, a path or a Hub repository (``hf://<owner>/<repo>[@<revision>]``).

    Raises:
        BundleError: naming what was looked for and the bundles that exist.
    """
    if isinstance(name_or_path, str) and name_or_path.startswith("hf://"):
        from pellucid.models.hub import download_bundle  # on demand: huggingface_hub is optional

        return download_bundle(name_or_path)
    path = Path(name_or_path)
    if path.is_dir():
        return path
    for root in checkpoints_dirs():
        candidate = root / str(name_or_path)
        if (candidate / METADATA_FILE).is_file():
            return candidate
    known = ", ".join(b.name for b in list_bundles()) or "none"
    searched = ", ".join(str(root) for root in checkpoints_dirs())
    raise BundleError(f"no bundle {str(name_or_path)!r}: not a folder and not in {searched}; bundles: {known}; "
                      "set PELLUCID_CHECKPOINTS to the folder that holds your own bundles")


def list_bundles() -> list[Path]:
    """Bundle folders (those holding a metadata.json) of :func:`checkpoints_dirs`, sorted by name.

    A user's bundle hides a shipped one of the same name, as :func:`resolve_bundle` finds it first.
    """
    found: dict[str, Path] = {}
    for root in checkpoints_dirs():
        if root.is_dir():
            for path in root.iterdir():
                if (path / METADATA_FILE).is_file():
                    found.setdefault(path.name, path)
    return [found[name] for name in sorted(found)]


def read_metadata(bundle: Path) -> dict[str, Any]:
    """The bundle's metadata.json.

    Raises:
        BundleError: when a required file is missing or the metadata lacks a field.
    """
    for required in (WEIGHTS_FILE, METADATA_FILE):
        if not (bundle / required).is_file():
            raise BundleError(f"bundle {bundle}: missing {required}")
    try:
        metadata = json.loads((bundle / METADATA_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"bundle {bundle}: {METADATA_FILE} is not valid JSON ({error}); the bundle is truncated or "
                          "was edited: export it again") from None
    if not isinstance(metadata, dict):
        raise BundleError(f"bundle {bundle}: {METADATA_FILE} must hold a JSON object, got {type(metadata).__name__}")
    for field in ("name", "model", "weights_sha256"):
        if field not in metadata:
            raise BundleError(f"bundle {bundle}: metadata.json has no {field!r} field")
    return metadata


def verify_weights(bundle: Path, metadata: dict[str, Any]) -> None:
    """Refuse weights whose sha256 differs from the one recorded in the metadata.

    Raises:
        BundleError: naming the file, the expected and the actual digest.
    """
    actual = sha256_of(bundle / WEIGHTS_FILE)
    if actual != metadata["weights_sha256"]:
        raise BundleError(f"bundle {bundle}: {WEIGHTS_FILE} has sha256 {actual}, metadata.json expects "
                          f"{metadata['weights_sha256']}; refusing a tampered or corrupted bundle")


def bundle_files(bundle: Path) -> list[str]:
    """The files a bundle's ``SHA256SUMS`` must cover: every regular file in the folder but itself, sorted.

    A Hub repository's ``.gitattributes`` (git's metadata, which the Hub adds to every repository) is no bundle file.
    """
    return sorted(p.name for p in bundle.iterdir()
                  if p.name not in (CHECKSUMS_FILE, ".gitattributes") and not p.is_dir())


def read_checksums(bundle: Path) -> dict[str, str]:
    """File name -> sha256 from the bundle's ``SHA256SUMS``.

    Raises:
        BundleError: when the file is missing or a line is not ``<64 hex digits>  <file name>``.
    """
    path = bundle / CHECKSUMS_FILE
    if not path.is_file():
        raise BundleError(f"bundle {bundle}: missing {CHECKSUMS_FILE} (the sha256 of every file of the bundle); "
                          f"a bundle exported before it existed gets one with `{HASH_COMMAND} {bundle}`")
    checksums = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name or any(c not in "0123456789abcdef" for c in digest):
            raise BundleError(f"bundle {bundle}: {CHECKSUMS_FILE} line {number} must be '<sha256 hex>  <file name>', "
                              f"got {line!r}")
        checksums[name] = digest
    return checksums


def verify_bundle(bundle: Path, metadata: dict[str, Any]) -> None:
    """Refuse a bundle any of whose files differs from its ``SHA256SUMS`` (or the weights from ``weights_sha256``).

    Raises:
        BundleError: naming the file that is changed, missing or not listed, with expected and actual digests.
    """
    checksums = read_checksums(bundle)
    unlisted = [name for name in bundle_files(bundle) if name not in checksums]
    if unlisted:
        raise BundleError(f"bundle {bundle}: file(s) {unlisted} are not in {CHECKSUMS_FILE}; refusing a bundle with "
                          "files nobody vouched for (remove them, or export the bundle again)")
    for name, expected in checksums.items():
        if Path(name).name != name or not (bundle / name).is_file():
            raise BundleError(f"bundle {bundle}: {CHECKSUMS_FILE} lists {name!r}, which is not a file of the bundle")
        actual = sha256_of(bundle / name)
        if actual != expected:
            raise BundleError(f"bundle {bundle}: {name} has sha256 {actual}, {CHECKSUMS_FILE} expects {expected}; "
                              "refusing a tampered or corrupted bundle")
    if WEIGHTS_FILE not in checksums or METADATA_FILE not in checksums:
        raise BundleError(f"bundle {bundle}: {CHECKSUMS_FILE} must list {WEIGHTS_FILE} and {METADATA_FILE}")
    if checksums[WEIGHTS_FILE] != metadata["weights_sha256"]:  # the weights were hashed above: compare, not re-hash
        raise BundleError(f"bundle {bundle}: {WEIGHTS_FILE} has sha256 {checksums[WEIGHTS_FILE]}, metadata.json "
                          f"expects {metadata['weights_sha256']}; refusing a tampered or corrupted bundle")


def build_from_metadata(metadata: dict[str, Any]) -> nn.Module:
    """Build the (untrained) architecture a bundle describes."""
    spec = metadata["model"]
    kwargs = dict(spec.get("kwargs", {}))
    if kwargs.get("concepts") is not None:
        kwargs["concepts"] = [as_concept_spec(c) for c in kwargs["concepts"]]
    model_builder(spec["name"])  # a clear error for an unknown architecture before anything else
    return create_model(spec["name"], **kwargs)


def load_pretrained(name_or_path: str | Path, expected_model: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load a provided checkpoint: the model (eval mode, weights loaded) and its metadata.

    Args:
        name_or_path: A zoo name (``pellucid zoo`` lists them) or a bundle folder.
        expected_model: When given, refuse a bundle of another architecture (registry name).

    Raises:
        BundleError: for a missing or incomplete bundle, a file whose sha256 differs from ``SHA256SUMS`` (metadata
            included) or another architecture.
    """
    bundle = resolve_bundle(name_or_path)
    metadata = read_metadata(bundle)
    verify_bundle(bundle, metadata)
    if expected_model is not None and metadata["model"]["name"] != expected_model:
        raise BundleError(f"bundle {bundle} holds a {metadata['model']['name']!r} model, expected "
                          f"{expected_model!r}")
    model = build_from_metadata(metadata)
    state: dict[str, Any] = dict(load_file(str(bundle / WEIGHTS_FILE)))
    state.update(metadata.get("extra_state", {}))  # JSON-able non-tensor state (e.g. prototype provenance)
    model.load_state_dict(state, strict=True)
    return model.eval(), metadata
