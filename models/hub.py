"""Bundles on the Hugging Face Hub: ``load_pretrained("hf://<owner>/<repo>[@<revision>]")`` and :func:`push_bundle`.

A Hub repository holds one bundle's files at its root (``weights.safetensors``, ``metadata.json``, ``config.yaml``,
``README.md``, ``SHA256SUMS``; the model card is the repository's card). Loading downloads it with
``huggingface_hub.snapshot_download`` into the Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``) and then verifies
every file against ``SHA256SUMS`` exactly as a local bundle (:func:`~pellucid.models.pretrained.verify_bundle`): a
file changed in the repository or in the cache is refused. With ``HF_HUB_OFFLINE=1`` (or without a network) the
cached snapshot is used and verified the same way. ``@<revision>`` pins a branch, tag or commit; pin a commit for a
reproducible result, as a branch can move.

``.gitattributes``, which the Hub adds to every repository, is neither downloaded nor part of a bundle.
``huggingface_hub`` is an optional dependency (``pip install 'pellucid[hub]'``); it is imported only here, on use.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pellucid.models.pretrained import (
    CHECKSUMS_FILE,
    BundleError,
    read_checksums,
    read_metadata,
    resolve_bundle,
    verify_bundle,
)

HUB_PREFIX = "hf://"
HUB_ONLY_FILES = (".gitattributes",)
REFERENCE_FORM = "hf://<owner>/<repo>[@<revision>]"


def is_hub_reference(name: Any) -> bool:
    """Whether ``name`` names a Hub repository (``hf://...``)."""
    return isinstance(name, str) and name.startswith(HUB_PREFIX)


def parse_hub_reference(reference: str) -> tuple[str, str | None]:
    """``"hf://owner/repo@rev"`` -> ``("owner/repo", "rev")`` (revision ``None`` when not given).

    Raises:
        BundleError: naming the reference and the expected form.
    """
    body = reference.removeprefix(HUB_PREFIX)
    repo_id, at, revision = body.partition("@")
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or (at and not revision):
        raise BundleError(f"bundle {reference!r}: expected {REFERENCE_FORM} (e.g. hf://my-lab/cbm-chest-ct@v1), "
                          f"got {reference!r}")
    return repo_id, revision or None


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise BundleError("loading or pushing a bundle on the Hugging Face Hub needs huggingface_hub: "
                          "pip install 'pellucid[hub]' (or pip install huggingface_hub)") from None
    return huggingface_hub


def download_bundle(reference: str, cache_dir: str | Path | None = None) -> Path:
    """The local folder of a Hub bundle: downloaded into the Hugging Face cache, or found there when offline.

    Files are not verified here; :func:`~pellucid.models.pretrained.load_pretrained` verifies what it loads.

    Args:
        reference: ``hf://<owner>/<repo>[@<revision>]``.
        cache_dir: The Hugging Face cache (default: ``HF_HUB_CACHE``, i.e. ``$HF_HOME/hub``).

    Raises:
        BundleError: for a malformed reference, an unknown repository or revision, or a bundle that is neither
            reachable nor cached (naming the cause and the fix).
    """
    repo_id, revision = parse_hub_reference(reference)
    hub = _hub()
    try:
        folder = hub.snapshot_download(repo_id, revision=revision, repo_type="model", cache_dir=cache_dir,
                                       ignore_patterns=list(HUB_ONLY_FILES))
    except OSError as error:  # huggingface_hub's download, offline and HTTP errors are all OSErrors
        raise BundleError(_download_problem(reference, error, hub)) from None
    return Path(folder)


def _download_problem(reference: str, error: OSError, hub: Any) -> str:
    from huggingface_hub.utils import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    cause = " ".join(f"{type(error).__name__}: {error}".split())
    if isinstance(error, RevisionNotFoundError):
        return f"bundle {reference}: the repository has no such revision ({cause}); name an existing branch, tag " \
               "or commit after '@'"
    if isinstance(error, RepositoryNotFoundError):
        return f"bundle {reference}: no such model repository on the Hub, or it is private and no token was given " \
               f"({cause}); check the name, or log in (hf auth login / HF_TOKEN)"
    if isinstance(error, LocalEntryNotFoundError):
        cache = hub.constants.HF_HUB_CACHE
        return f"bundle {reference}: not in the Hugging Face cache ({cache}) and the Hub was not reached " \
               f"(HF_HUB_OFFLINE={'1' if hub.constants.HF_HUB_OFFLINE else '0'}; {cause}); download it once with " \
               "a network, or point HF_HUB_CACHE at a cache that holds it"
    return f"bundle {reference}: download failed ({cause})"


def push_bundle(bundle: str | Path, repo_id: str, *, revision: str | None = None, private: bool = False,
                token: str | None = None, commit_message: str | None = None,
                api_factory: Callable[..., Any] | None = None) -> Any:
    """Upload a verified local bundle to a Hub model repository (created when missing); return the commit info.

    Exactly the files ``SHA256SUMS`` lists, and ``SHA256SUMS`` itself, are uploaded; files of an earlier upload that
    the bundle no longer has are deleted in the same commit, so the repository holds one bundle that verifies.

    Args:
        bundle: A zoo name or a bundle folder.
        repo_id: ``<owner>/<repo>`` on the Hub.
        revision: A branch to push to (created from the default branch when missing); default: the default branch.
        private: Create the repository as private (an existing repository keeps its visibility).
        token: A Hub token (default: the one ``hf auth login`` stored, or ``HF_TOKEN``).
        commit_message: Default: ``"pellucid bundle <name> <version>"``.
        api_factory: Builds the API client from ``token`` (default ``huggingface_hub.HfApi``).

    Raises:
        BundleError: when the bundle does not verify (nothing is uploaded) or the repository id is malformed.
    """
    parse_hub_reference(HUB_PREFIX + repo_id)
    if is_hub_reference(bundle):
        raise BundleError(f"push: {bundle} is already on the Hub; push a local bundle folder or zoo name")
    folder = resolve_bundle(bundle)
    metadata = read_metadata(folder)
    verify_bundle(folder, metadata)  # refuse to publish a tampered or incomplete bundle
    files = [CHECKSUMS_FILE, *read_checksums(folder)]
    api = (api_factory or _hub().HfApi)(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                             allow_patterns=files, delete_patterns=["*"],
                             commit_message=commit_message or f"pellucid bundle {metadata['name']} "
                                                              f"{metadata.get('version', '')}".strip())
