"""A model repository as a git commit holds it, for building a bundle from a ref rather than
from the working tree (`serverctl build --git-ref REF`)."""

from __future__ import annotations

import subprocess
import tarfile
import tempfile
from pathlib import Path

from .manifest import Source


class GitRefError(ValueError):
    """The ref cannot be read; the message says which and git's reason."""


def _git(folder: Path, *arguments: str) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(folder), *arguments], capture_output=True, text=True
        )
    except OSError as exc:
        raise GitRefError(f"--git-ref needs git, which cannot be run here ({exc})") from None
    if done.returncode != 0:
        said = done.stderr.strip().splitlines()
        raise GitRefError(
            f"git {arguments[0]} in {folder} failed: {said[-1] if said else done.returncode}"
        )
    return done.stdout.strip()


def export(repository: Path, ref: str) -> tuple[Path, Source]:
    """The files of `repository` (a folder inside a git checkout) as commit `ref` has them,
    in a new temporary folder the caller removes, and that commit."""
    try:
        commit = _git(repository, "rev-parse", "--verify", "--end-of-options", f"{ref}^{{commit}}")
    except GitRefError as exc:
        raise GitRefError(
            f"--git-ref {ref} is not a commit, branch or tag of the git checkout holding "
            f"{repository} ({exc})"
        ) from None
    prefix = _git(repository, "rev-parse", "--show-prefix")
    top = Path(_git(repository, "rev-parse", "--show-toplevel"))
    target = Path(tempfile.mkdtemp(prefix="tiffin-git-"))
    archive = target / "tree.tar"
    # COMMIT:PATH is the repository folder's tree at that commit, rooted at it.
    _git(top, "archive", "--format=tar", f"--output={archive}", f"{commit}:{prefix}")
    folder = target / repository.resolve().name
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")  # git's own archive; refused links stay out
    archive.unlink()
    return folder, Source(commit=commit, dirty=False)
