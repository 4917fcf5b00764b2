"""Building a bundle from a model repository that has been checked (serverctl build checks it).

The bundle holds each model folder under `repository/`, the locked requirements, optionally a
wheelhouse under `wheels/`, and the manifest that hashes them all. Nothing in it depends on
when or where it was built, so the same repository and environment give the same bytes.
"""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from .archive import write_archive
from .lock import lock_requirements
from .manifest import (
    LOCK_FILE,
    MANIFEST_FILE,
    REPOSITORY_DIR,
    WHEELS_DIR,
    Manifest,
    Source,
    sha256_bytes,
    sha256_file,
)
from .manifest import content_hash as hash_of_files
from .wheelhouse import build_wheelhouse

#: Names never packed: caches that Python or editors leave beside the models.
_SKIPPED = ("__pycache__", ".ipynb_checkpoints")


class BuildError(ValueError):
    """The repository cannot be made into a bundle; the message names the file and why."""


def model_files(model_dir: Path) -> Iterator[tuple[str, Path | None]]:
    """(path inside the model folder, file) for each file of a model folder, and (path, None)
    for each folder with nothing in it (a proxy model's version folder); hidden files and
    caches skipped. Links are followed only while they stay inside the model folder, as the
    repository reader follows them."""
    root = model_dir.resolve()
    seen: set[Path] = set()
    for folder, dirnames, filenames in os.walk(model_dir, followlinks=True):
        here = Path(folder)
        real = here.resolve()
        if not real.is_relative_to(root):
            raise BuildError(f"{here}: a link to {real}, outside the model folder {root}")
        if real in seen:
            raise BuildError(f"{here}: links make a loop back to {real}")
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _SKIPPED)
        filenames = sorted(f for f in filenames if not f.startswith(".") and not f.endswith(".pyc"))
        if not dirnames and not filenames and here != model_dir:
            yield here.relative_to(model_dir).as_posix(), None
        for filename in filenames:
            path = here / filename
            if not path.resolve().is_relative_to(root):
                raise BuildError(
                    f"{path}: a link to {path.resolve()}, outside the model folder {root}"
                )
            if not path.is_file():
                raise BuildError(f"{path}: not a regular file")
            yield path.relative_to(model_dir).as_posix(), path


def git_source(repository: Path) -> Source | None:
    """The commit the repository's folder is checked out at, and whether its files differ."""

    def git(*arguments: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(repository), *arguments], capture_output=True, text=True
            )
        except OSError:  # no git here
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    changes = git("status", "--porcelain", "--", ".")
    return Source(commit=commit, dirty=bool(changes))


def build_bundle(
    output: Path,
    name: str,
    tag: str,
    repository: Path,
    model_dirs: list[Path],
    backends: list[str],
    requirement_files: list[Path],
    wheels: bool = False,
    source: Source | None = None,
) -> Manifest:
    """Writes the bundle of `model_dirs` (the repository's model folders) to `output`; an
    empty `tag` becomes the first 12 digits of the content hash. `source`: the commit the
    files come from (default: the one `repository` is checked out at, if any)."""
    entries: dict[str, Path | bytes | None] = {}
    for model_dir in sorted(model_dirs, key=lambda p: p.name):
        for inside, path in model_files(model_dir):
            entries[f"{REPOSITORY_DIR}/{model_dir.name}/{inside}"] = path
    lock = lock_requirements(backends, requirement_files)
    entries[LOCK_FILE] = lock.encode()
    with tempfile.TemporaryDirectory(prefix="tiffin-wheels-") as scratch:
        if wheels:
            for wheel in build_wheelhouse(lock, Path(scratch)):
                entries[f"{WHEELS_DIR}/{wheel.name}"] = wheel
        files = {
            entry: sha256_file(content) if isinstance(content, Path) else sha256_bytes(content)
            for entry, content in entries.items()
            if content is not None
        }
        folders = sorted(entry for entry, content in entries.items() if content is None)
        whole = hash_of_files(files, folders)
        manifest = Manifest(
            name=name,
            tag=tag or whole[:12],  # the content names the version when no tag is given
            tiffin=metadata.version("tiffin"),
            python=platform.python_version(),
            backends=sorted(set(backends)),
            source=source or git_source(repository),
            files=files,
            folders=folders,
            content_hash=whole,
        )
        entries[MANIFEST_FILE] = manifest.to_bytes()
        write_archive(output, entries.items())
    return manifest
