"""Bundles through the Hugging Face Hub path, offline: push (a mocked upload) and load from the local HF cache.

There is no network here. A push is recorded by replacing ``HfApi.create_repo``/``upload_folder``; the "Hub" it
writes to is a Hugging Face cache laid out by hand as ``huggingface_hub`` lays it out (``models--<owner>--<repo>/
blobs``, ``snapshots/<commit>/<file>`` links to the blobs, ``refs/main``), which ``load_pretrained("hf://...")`` then
reads with ``HF_HUB_OFFLINE=1``, verifying ``SHA256SUMS`` as for a local bundle.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants
from synthetic import make_batch

from pellucid.models.hub import parse_hub_reference, push_bundle
from pellucid.models.pretrained import BundleError, load_pretrained
from pellucid.training import InterpretableModule
from pellucid.training.bundle import export_bundle
from pellucid.training.cli import main

BUNDLE_FILES = ["README.md", "SHA256SUMS", "metadata.json", "weights.safetensors"]


def cache_snapshot(cache: Path, repo_id: str, files: dict[str, bytes], commit: str) -> Path:
    """Lay out one commit of a model repository in a Hugging Face cache; ``refs/main`` points at it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture()
def bundle(tmp_path: Path) -> tuple[InterpretableModule, Path]:
    torch.manual_seed(0)
    module = InterpretableModule("blackbox", spatial_dims=2, in_channels=1, num_classes=3,
                                 class_names=["normal", "benign", "malignant"],
                                 model_kwargs={"backbone_kwargs": {"channels": [4, 8], "strides": [2, 2]}}).eval()
    return module, export_bundle(module, tmp_path / "toy", "toy", metrics={"test/accuracy": 0.5})


@pytest.fixture()
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` as huggingface_hub read them (its constants, read at import)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


class FakeHub:
    """Stands in for ``HfApi``: records each call; an upload becomes a commit in ``cache``."""

    calls: list[tuple[str, dict]] = []
    cache: Path

    def __init__(self, token: str | None = None) -> None:
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id: str, **options) -> None:
        self.calls.append(("create_repo", {"repo_id": repo_id, **options}))

    def upload_folder(self, *, repo_id: str, folder_path: str, allow_patterns: list[str], **options):
        self.calls.append(("upload_folder", {"repo_id": repo_id, "folder_path": folder_path,
                                             "allow_patterns": allow_patterns, **options}))
        uploaded = {name: (Path(folder_path) / name).read_bytes() for name in sorted(os.listdir(folder_path))
                    if name in allow_patterns}
        commit = hashlib.sha1(b"".join(uploaded.values())).hexdigest()
        cache_snapshot(self.cache, repo_id, {**uploaded, ".gitattributes": b"*.safetensors filter=lfs\n"}, commit)
        return SimpleNamespace(oid=commit, commit_url=f"https://huggingface.co/{repo_id}/commit/{commit}")


def test_push_uploads_exactly_the_verified_files_and_the_bundle_loads_back_offline(
        bundle, offline_cache: Path, tmp_path: Path) -> None:
    module, path = bundle
    (path / ".gitattributes").write_text("*.bin binary\n")  # not a bundle file, never uploaded
    FakeHub.calls, FakeHub.cache = [], offline_cache
    commit = push_bundle(path, "lab/toy-cbm", commit_message="first", api_factory=FakeHub)
    names = [name for name, _ in FakeHub.calls]
    assert names == ["init", "create_repo", "upload_folder"]
    assert FakeHub.calls[1][1] == {"repo_id": "lab/toy-cbm", "repo_type": "model", "private": False, "exist_ok": True}
    upload = FakeHub.calls[2][1]
    assert upload["repo_id"] == "lab/toy-cbm" and Path(upload["folder_path"]) == path
    assert sorted(upload["allow_patterns"]) == BUNDLE_FILES and upload["delete_patterns"] == ["*"]
    assert upload["commit_message"] == "first" and upload["repo_type"] == "model"
    # the round trip: loaded from the (offline) cache the upload wrote, verified, same predictions
    image = make_batch(2)["image"]
    for reference in ("hf://lab/toy-cbm", f"hf://lab/toy-cbm@{commit.oid}"):
        model, metadata = load_pretrained(reference)
        torch.testing.assert_close(model(image, explain=False).logits, module.model(image, explain=False).logits)
        assert metadata["classes"] == ["normal", "benign", "malignant"]


def test_a_changed_file_in_the_cache_is_refused_by_the_sha256_check(bundle, offline_cache: Path) -> None:
    _, path = bundle
    files = {name: (path / name).read_bytes() for name in BUNDLE_FILES}
    snapshot = cache_snapshot(offline_cache, "lab/toy", files, "a" * 40)
    assert load_pretrained("hf://lab/toy")[1]["name"] == "toy"
    blob = (snapshot / "metadata.json").resolve()
    blob.write_bytes(blob.read_bytes().replace(b'"malignant"', b'"benign2"'))
    with pytest.raises(BundleError, match=r"metadata.json has sha256 [0-9a-f]{64}, SHA256SUMS expects "
                                          r"[0-9a-f]{64}; refusing a tampered or corrupted bundle"):
        load_pretrained("hf://lab/toy")
    (snapshot / "notes.txt").write_text("added later")
    with pytest.raises(BundleError, match=r"file\(s\) \['notes.txt'\] are not in SHA256SUMS"):
        load_pretrained("hf://lab/toy")


def test_a_tampered_bundle_is_never_pushed_and_bad_references_are_named(bundle, offline_cache: Path) -> None:
    _, path = bundle
    (path / "README.md").write_text("edited card")
    FakeHub.calls, FakeHub.cache = [], offline_cache
    with pytest.raises(BundleError, match=r"README.md has sha256 .* refusing a tampered or corrupted bundle"):
        push_bundle(path, "lab/toy", api_factory=FakeHub)
    assert FakeHub.calls == []  # refused before any client was made
    assert parse_hub_reference("hf://lab/toy@v1") == ("lab/toy", "v1")
    for reference in ("hf://toy", "hf://lab/toy/extra", "hf://lab/toy@", "hf:///toy"):
        with pytest.raises(BundleError, match=r"expected hf://<owner>/<repo>\[@<revision>\]"):
            load_pretrained(reference)
    with pytest.raises(BundleError, match=r"hf://lab/absent: not in the Hugging Face cache \(.*hf-cache\) and the "
                                          r"Hub was not reached \(HF_HUB_OFFLINE=1"):
        load_pretrained("hf://lab/absent")


def test_pellucid_push_and_load_through_the_environment_variables(bundle, tmp_path: Path, monkeypatch,
                                                                   capsys) -> None:
    """``pellucid push`` with HfApi's two calls replaced; a fresh process loads it with HF_HUB_OFFLINE=1."""
    module, path = bundle
    cache = tmp_path / "env-cache"
    cache.mkdir()
    FakeHub.calls, FakeHub.cache = [], cache
    recorder = FakeHub()
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda _api, repo_id, **options: recorder.create_repo(repo_id, **options))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda _api, **o: recorder.upload_folder(**o))
    main(["push", str(path), "lab/toy", "--message", "from the command"])
    printed = capsys.readouterr().out
    oid = (cache / "models--lab--toy" / "refs" / "main").read_text()
    assert [call[1]["commit_message"] for call in FakeHub.calls if call[0] == "upload_folder"] == ["from the command"]
    assert f"load_pretrained('hf://lab/toy@{oid}')" in printed and f"--init_from hf://lab/toy@{oid}" in printed
    script = ("from pellucid.models.pretrained import load_pretrained, BundleError\n"
              f"model, metadata = load_pretrained('hf://lab/toy@{oid}')\n"
              "print('classes', metadata['classes'])\n"
              "try:\n    load_pretrained('hf://lab/other')\n"
              "except BundleError as error:\n    print('refused', error)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf-home")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "classes ['normal', 'benign', 'malignant']" in result.stdout
    assert "refused bundle hf://lab/other: not in the Hugging Face cache" in result.stdout
