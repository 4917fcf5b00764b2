"""Locked requirements: the exact versions, installed here, of what a bundle needs to run.

A bundle runs the same elsewhere when it gets the same packages: Tiffin and everything it
depends on, each backend's framework, and what each python model's `requirements.txt`
names, with their own dependencies, each pinned to the version installed in the environment
that built (and validated) the bundle. The result is a pip requirements file, sorted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from packaging.requirements import Requirement

# `packaging` is imported where a lock is made, not here: `serverctl` imports this module for
# `build`, and a server image need not hold what only building uses.

#: The distributions behind each registered backend; the first one installed is locked.
#: Backends missing here need nothing beyond Tiffin's own dependencies.
FRAMEWORKS: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "torch": ("torch",),
}


class LockError(ValueError):
    """A requirement that cannot be pinned here; the message says which and why."""


def _installed(name: str) -> metadata.Distribution | None:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None


def _closure(roots: Iterable[tuple[Requirement, str]]) -> dict[str, str]:
    """canonical name -> installed version of each root and, recursively, of what it needs
    (extras followed, environment markers evaluated for this interpreter)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pinned: dict[str, str] = {}
    todo = list(roots)
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        requirement, why = todo.pop()
        key = (canonicalize_name(requirement.name), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        found = _installed(requirement.name)
        if found is None:
            raise LockError(
                f"{why} needs {requirement}, which is not installed here; install it so that "
                "the bundle can lock the version it was checked with"
            )
        version = found.version
        if requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
            raise LockError(
                f"{why} needs {requirement}, but {found.metadata['Name']} {version} is installed"
            )
        pinned[key[0]] = version
        for text in found.requires or []:
            child = Requirement(text)
            if child.marker is not None and not any(
                child.marker.evaluate({"extra": extra}) for extra in (requirement.extras or {""})
            ):
                continue
            todo.append((child, f"{found.metadata['Name']} {version}"))
    return pinned


def read_requirements_file(path: Path) -> list[Requirement]:
    """The requirements a python model's requirements.txt names; LockError for what a lock
    cannot hold (options, URLs, editable installs)."""
    from packaging.requirements import InvalidRequirement, Requirement

    requirements = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = re.sub(r"(^|\s)#.*", "", line).strip()
        if not text:
            continue
        try:
            requirement = Requirement(text)
        except InvalidRequirement:
            raise LockError(
                f"{path}, line {number}: {text!r} is not a requirement a bundle can lock "
                "(name and version specifier only, such as 'scipy>=1.11')"
            ) from None
        if requirement.url:
            raise LockError(f"{path}, line {number}: {text!r} names a URL; bundles lock versions")
        if requirement.marker is None or requirement.marker.evaluate():
            requirements.append(requirement)
    return requirements


def lock_requirements(backends: Iterable[str], requirement_files: Iterable[Path]) -> str:
    """The locked requirements of a bundle whose models use `backends` and whose python
    models name `requirement_files`, as a sorted pip requirements file."""
    from packaging.requirements import Requirement

    roots: list[tuple[Requirement, str]] = [(Requirement("tiffin"), "Tiffin")]
    for backend in sorted(set(backends)):
        candidates = FRAMEWORKS.get(backend, ())
        chosen = next((name for name in candidates if _installed(name)), None)
        if candidates and chosen is None:
            raise LockError(
                f"the {backend} backend needs {' or '.join(candidates)}, which is not "
                "installed here; a bundle locks the framework version it was checked with"
            )
        if chosen:
            roots.append((Requirement(chosen), f"the {backend} backend"))
    for path in sorted(requirement_files):
        roots += [(r, str(path)) for r in read_requirements_file(path)]
    pinned = _closure(roots)
    return "".join(f"{name}=={version}\n" for name, version in sorted(pinned.items()))
