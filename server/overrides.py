"""Loading a model with what the load call brings: Triton's `config` and `file:` parameters.

`RepositoryModelLoad` may carry `config` (the model's config as JSON, replacing its
config.yaml) and `file:<version>/<path>` parameters (model files, for clients that cannot
write the repository; Triton's rule: files need a config). The server lays the model out in
a staging folder of its own, `<staging>/<model>-<n>/<model>/`, and reads it there as it
reads any model folder, with the same checks: with files, the folder holds only what was
sent; with a config alone, the repository folder's version folders are linked in (hard
links, else copies), so the repository itself is never written.

Uploaded files are data, never code: they are taken only for models that the ONNX Runtime
backend runs (a python model's `model.py` or a pickled torch file would be code sent over
the wire), and every path is checked, component by component, before a byte is written.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tiffin.protos.errors import InvalidInput
from tiffin.protos.names import name_problem, shown

from .repository import CONFIG_FILE, MAX_CONFIG_BYTES, ModelSpec, read_model

MAX_FILES = 256
MAX_PATH_PARTS = 8
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")
# The backends whose model files are data: what an upload may hold.
DATA_BACKENDS = ("onnxruntime",)


@dataclass(frozen=True)
class Override:
    """A load call's config (JSON text, "" for none) and files (relative path -> bytes)."""

    config: str
    files: dict[str, bytes]


def parse_override(parameters: Mapping[str, Any]) -> Override | None:
    """The override a load call's parameters ask for, None for a plain reload;
    InvalidInput naming the parameter that is wrong."""
    config = parameters.get("config")
    files: dict[str, bytes] = {}
    for key, value in parameters.items():
        if key == "config":
            continue
        if not key.startswith("file:"):
            raise InvalidInput(
                f"the load parameter '{shown(key, 80)}' is not one this server takes "
                "('config', 'file:<version>/<name>', or 'traffic')"
            )
        if len(files) >= MAX_FILES:
            raise InvalidInput(f"a load may bring at most {MAX_FILES} files")
        files[_checked_path(key[5:])] = _file_bytes(key, value)
    if config is None and not files:
        return None
    if files and config is None:
        raise InvalidInput("file: parameters need a 'config' parameter too (as in Triton)")
    if not isinstance(config, str) or len(config) > MAX_CONFIG_BYTES:
        raise InvalidInput(f"'config' must be JSON text of at most {MAX_CONFIG_BYTES} bytes")
    try:
        document = json.loads(config)
    except ValueError as exc:
        raise InvalidInput(f"'config' is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidInput("'config' must be a JSON object: the model's config")
    if files:
        # Decided before anything is written or read: a backend that would import or
        # unpickle what was sent never sees it.
        backend = document.get("backend") or {"onnxruntime_onnx": "onnxruntime"}.get(
            str(document.get("platform", "")), ""
        )
        if backend not in DATA_BACKENDS:
            raise InvalidInput(
                f"files sent with a load are taken only for models whose config names "
                f"backend {' or '.join(DATA_BACKENDS)} (this one names "
                f"'{shown(str(backend), 60) or 'none'}'): a model's code is not taken over "
                "the wire; put it in the repository"
            )
    return Override(config, files)


def _checked_path(path: str) -> str:
    parts = path.split("/")
    if len(parts) < 2 or len(parts) > MAX_PATH_PARTS or not parts[0].isdigit():
        raise InvalidInput(
            f"file:{shown(path, 80)} must be file:<version>/<name>, such as file:1/model.onnx"
        )
    for part in parts[1:]:
        if not _PART.fullmatch(part) or part in (".", ".."):
            raise InvalidInput(
                f"file:{shown(path, 80)} has a name part '{shown(part, 40)}' that is not "
                "letters, digits, '_', '.', '+' or '-'"
            )
    return f"{int(parts[0])}/" + "/".join(parts[1:])


def _file_bytes(key: str, value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):  # REST carries files as base64
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(f"{shown(key, 80)} is not base64") from None
    raise InvalidInput(f"{shown(key, 80)} must hold the file's bytes")


class StagingArea:
    """The server's folder for models laid out from load calls; removed when it stops."""

    def __init__(self) -> None:
        self._root: Path | None = None
        self._count = itertools.count(1)

    def lay_out(
        self,
        name: str,
        override: Override,
        repository: Path,
        allowed_backends: Sequence[str] | None,
    ) -> ModelSpec:
        """The model as the override describes it, read from its staging folder."""
        problem = name_problem(name)
        if problem:
            raise InvalidInput(f"failed to load: {problem}")
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="tiffin-overrides-"))
        folder = self._root / f"{name}-{next(self._count)}" / name
        folder.mkdir(parents=True)
        try:
            return self._fill(folder, name, override, repository, allowed_backends)
        except BaseException:
            self.remove(folder)
            raise

    def _fill(
        self,
        folder: Path,
        name: str,
        override: Override,
        repository: Path,
        allowed_backends: Sequence[str] | None,
    ) -> ModelSpec:
        (folder / CONFIG_FILE).write_text(override.config)  # JSON is YAML
        if override.files:
            for path, data in override.files.items():
                target = folder / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
        else:
            source = repository / name
            if not source.is_dir():
                raise InvalidInput(f"failed to load '{name}': the repository has no such model")
            for version in source.iterdir():
                if version.name.isdigit() and version.is_dir():
                    shutil.copytree(version, folder / version.name, copy_function=_link_or_copy)
        return read_model(folder, allowed_backends)

    def remove(self, folder: Path) -> None:
        """Removes a model's staging folder (`folder` is the model folder inside it)."""
        if self._root is not None and folder.parent.parent == self._root:
            shutil.rmtree(folder.parent, ignore_errors=True)

    def clear(self) -> None:
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not allowed: copy
        shutil.copy2(source, target)
