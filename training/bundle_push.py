"""``pellucid push <bundle> <owner/repo>``: publish a bundle on the Hugging Face Hub (:mod:`pellucid.models.hub`).

The bundle is verified against its ``SHA256SUMS`` first (a tampered bundle is refused before anything is uploaded);
then exactly its listed files and ``SHA256SUMS`` are uploaded in one commit. Anyone loads it back, verified the same
way, with ``load_pretrained("hf://<owner>/<repo>@<commit>")``, ``--init_from hf://<owner>/<repo>@<commit>`` or
``pellucid report --ckpt hf://...``. Also ``python -m pellucid.training.bundle_push <bundle> <owner/repo>``.
"""

from __future__ import annotations

import argparse

from pellucid.models.hub import push_bundle


def push_main(argv: list[str] | None = None) -> None:
    """Parse ``pellucid push`` arguments, push, and say where the bundle is and how to load it."""
    parser = argparse.ArgumentParser(prog="pellucid push", description="upload a bundle to the Hugging Face Hub")
    parser.add_argument("bundle", help="bundle folder or zoo name (pellucid zoo lists them)")
    parser.add_argument("repo_id", help="model repository on the Hub, <owner>/<repo> (created when missing)")
    parser.add_argument("--revision", default=None, help="branch to push to (default: the repository's main branch)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--message", default=None, help="commit message")
    options = parser.parse_args(argv)
    commit = push_bundle(options.bundle, options.repo_id, revision=options.revision, private=options.private,
                         commit_message=options.message)
    oid = getattr(commit, "oid", None)
    pinned = f"hf://{options.repo_id}@{oid}" if oid else f"hf://{options.repo_id}"
    print(f"pushed bundle {options.bundle} to {getattr(commit, 'commit_url', None) or options.repo_id}\n"
          f"  load it (verified against SHA256SUMS): load_pretrained({pinned!r}) or --init_from {pinned}")


if __name__ == "__main__":
    push_main()
