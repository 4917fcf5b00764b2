"""The local bundle store: bundles kept by content hash, and name:tag labels pointing at them.

Layout under the store folder (`~/.tiffin/bundles`, or TIFFIN_BUNDLE_STORE):

    sha256/<content hash>.tar.gz      each bundle once, named by its content hash
    tags/<name>/<tag>.json            {"hash": ..., "created": ...}: the bundle a tag names

A tag moves when a bundle of the same name and tag is added again, or when it is set on a
stored bundle (`tag`): promoting is tagging a bundle `prod`, rolling back is tagging the one
that served before.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .archive import BundleError, read_manifest

STORE_VARIABLE = "TIFFIN_BUNDLE_STORE"
#: Names and tags: what a folder or file name can safely be.
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HASH = re.compile(r"^[0-9a-f]{12,64}$")


def label_problem(what: str, value: str) -> str:
    """Why `value` cannot be a bundle name or tag ("" when it can); `what` names it."""
    if _LABEL.match(value):
        return ""
    return (
        f"{what} {value!r} must be 1 to 128 letters, digits, '.', '_' or '-', starting with a "
        "letter or digit"
    )


@dataclass(frozen=True)
class Entry:
    """A tag in the store."""

    name: str
    tag: str
    content_hash: str
    created: float  # when the tag was set, seconds since the epoch
    path: Path


class BundleStore:
    """A folder of bundles, content-addressed, with tags."""

    def __init__(self, root: Path | None = None) -> None:
        if root is None:
            root = Path(os.environ.get(STORE_VARIABLE) or Path.home() / ".tiffin" / "bundles")
        self.root = root

    def path_of(self, content_hash: str) -> Path:
        """Where the bundle with this content hash is kept."""
        return self.root / "sha256" / f"{content_hash}.tar.gz"

    def add(self, bundle: Path) -> Entry:
        """Copies `bundle` into the store (once per content) and points its name:tag at it."""
        manifest = read_manifest(bundle)
        for what, value in (("name", manifest.name), ("tag", manifest.tag)):
            problem = label_problem(what, value)
            if problem:
                raise BundleError(f"bundle {bundle}: {problem}")
        kept = self.path_of(manifest.content_hash)
        if not kept.exists():
            kept.parent.mkdir(parents=True, exist_ok=True)
            partial = kept.with_name(kept.name + ".partial")
            shutil.copyfile(bundle, partial)
            partial.replace(kept)
        return self._set_tag(manifest.name, manifest.tag, manifest.content_hash)

    def tag(self, reference: str, name: str, tag: str) -> Entry:
        """Points name:tag at the bundle `reference` names (promoting it, or rolling back to
        it); the bundle's own manifest keeps the name and tag it was built with."""
        for what, value in (("name", name), ("tag", tag)):
            problem = label_problem(what, value)
            if problem:
                raise BundleError(problem)
        _, content_hash = self.resolve(reference)
        return self._set_tag(name, tag, content_hash)

    def _set_tag(self, name: str, tag: str, content_hash: str) -> Entry:
        created = time.time()
        tag_file = self.root / "tags" / name / f"{tag}.json"
        tag_file.parent.mkdir(parents=True, exist_ok=True)
        partial = tag_file.with_name(tag_file.name + ".partial")
        partial.write_text(json.dumps({"hash": content_hash, "created": created}))
        partial.replace(tag_file)
        return Entry(name, tag, content_hash, created, self.path_of(content_hash))

    def entries(self) -> list[Entry]:
        """Every tag, by name then newest first."""
        found = []
        for tag_file in sorted((self.root / "tags").glob("*/*.json")):
            try:
                record = json.loads(tag_file.read_text())
                content_hash, created = str(record["hash"]), float(record["created"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a tag being written, or not one of ours
            found.append(
                Entry(
                    tag_file.parent.name,
                    tag_file.stem,
                    content_hash,
                    created,
                    self.path_of(content_hash),
                )
            )
        return sorted(found, key=lambda e: (e.name, -e.created))

    def resolve(self, reference: str) -> tuple[Path, str]:
        """The stored bundle that `reference` names (name:tag, or a content hash or a prefix
        of at least 12 characters) and its content hash; BundleError when none or several."""
        if ":" in reference:
            name, _, tag = reference.partition(":")
            matches = [e for e in self.entries() if e.name == name and e.tag == tag]
            hashes = {e.content_hash for e in matches}
        elif _HASH.match(reference):
            hashes = {p.name.removesuffix(".tar.gz") for p in self._bundles()}
            hashes = {h for h in hashes if h.startswith(reference)}
        else:
            hashes = set()
        if len(hashes) > 1:
            raise BundleError(f"bundle {reference!r} matches several bundles in {self.root}")
        if not hashes:
            raise BundleError(
                f"bundle {reference!r} is neither a file nor a name:tag or hash in the bundle "
                f"store {self.root} (serverctl bundles lists them)"
            )
        content_hash = hashes.pop()
        path = self.path_of(content_hash)
        if not path.is_file():
            raise BundleError(f"bundle {reference!r}: {path} is missing from the store")
        return path, content_hash

    def _bundles(self) -> list[Path]:
        return sorted((self.root / "sha256").glob("*.tar.gz"))
