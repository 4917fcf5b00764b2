"""A bundle's manifest: what it holds, and the hash of every file in it and of the whole.

The manifest is `manifest.json` at the top of the bundle. It names every other file of the
bundle with its sha256; the content hash is the sha256 of those (path, hash) pairs, so two
bundles with the same content hash hold the same bytes. It records nothing that changes from
one build to the next (no build time): building twice gives the same manifest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MANIFEST_FILE = "manifest.json"
LOCK_FILE = "requirements.lock"
REPOSITORY_DIR = "repository"
WHEELS_DIR = "wheels"
FORMAT = 1


class Source(BaseModel):
    """Where the repository came from, when it is in git."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    commit: str = Field(description="The commit checked out when the bundle was built.")
    dirty: bool = Field(description="Whether the repository's files differed from the commit.")


class Manifest(BaseModel):
    """What a bundle holds; `manifest.json`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: int = Field(FORMAT, description="Version of this layout.")
    name: str = Field(description="The bundle's name.")
    tag: str = Field(description="The bundle's version tag.")
    tiffin: str = Field(description="The Tiffin version that built it.")
    python: str = Field(description="The Python version that built it (major.minor.micro).")
    backends: list[str] = Field(description="The backends its models use, sorted.")
    source: Source | None = Field(None, description="The git commit it was built from, if any.")
    files: dict[str, str] = Field(description="Every other file of the bundle -> its sha256.")
    folders: list[str] = Field(
        default_factory=list,
        description="Empty folders the repository needs (a proxy model's version folder).",
    )
    content_hash: str = Field(description="sha256 over `files` and `folders` (`content_hash`).")

    def to_bytes(self) -> bytes:
        """The manifest as written into the bundle: sorted keys, so the same on every build."""
        return (json.dumps(self.model_dump(), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        """The manifest read from `data`; ValueError naming `where` when it is not one."""
        try:
            raw: Any = json.loads(data)
            manifest = cls.model_validate(raw)
        except (ValueError, ValidationError) as exc:
            first = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
            raise ValueError(
                f"{where}: {MANIFEST_FILE} is not a bundle manifest: {first}"
            ) from None
        if manifest.format != FORMAT:
            raise ValueError(
                f"{where}: bundle format {manifest.format} is not one this Tiffin reads ({FORMAT})"
            )
        if content_hash(manifest.files, manifest.folders) != manifest.content_hash:
            raise ValueError(
                f"{where}: {MANIFEST_FILE}'s content_hash does not match its files; the "
                "manifest was changed after the bundle was built"
            )
        return manifest


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """The sha256 of `data`, as hex."""
    return hashlib.sha256(data).hexdigest()


def content_hash(files: dict[str, str], folders: list[str] | None = None) -> str:
    """The hash of a bundle's whole content: sha256 over its sorted "path\\0sha256\\n" lines,
    then a "path/\\n" line for each empty folder, sorted."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(f"{path}\0{files[path]}\n".encode())
    for folder in sorted(folders or []):
        digest.update(f"{folder}/\n".encode())
    return digest.hexdigest()
