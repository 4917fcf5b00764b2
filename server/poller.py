"""Poll mode (`--model-control-mode poll`): the server follows its repository's changes.

Every `--repository-poll-secs` the repository's folders are fingerprinted (each file's path,
size and modification time; nothing is read) and compared with the last look: a new model
folder is loaded, a changed one loaded again (the registry swaps it atomically, and a broken
change leaves the old versions serving), a removed one unloaded. Each change is logged. A
model whose files are still being written shows a new fingerprint at the next look too and
is loaded again then, so a change copied in over several seconds settles.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable
from pathlib import Path

from tiffin.protos.errors import TiffinError
from tiffin.protos.names import name_problem

from .registry import ModelRegistry

log = logging.getLogger(__name__)

# A model folder is a config and a few version folders; past this many files it is not
# looked into further (its fingerprint is what was seen), so a stray huge tree costs little.
MAX_FILES_PER_MODEL = 10_000

Fingerprint = tuple[tuple[str, int, int], ...]


def fingerprint(folder: Path) -> Fingerprint:
    """(relative path, size, mtime) of the folder's files (and its folders, by name), sorted;
    links followed to files."""
    seen: list[tuple[str, int, int]] = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        # Folders count by name: an empty version folder added or removed is a change.
        seen += [(os.path.relpath(os.path.join(root, d), folder) + "/", 0, 0) for d in dirs]
        for name in sorted(files):
            path = os.path.join(root, name)
            try:
                info = os.stat(path)
            except OSError:
                continue  # removed while looked at: the next look sees it gone
            seen.append((os.path.relpath(path, folder), info.st_size, info.st_mtime_ns))
            if len(seen) >= MAX_FILES_PER_MODEL:
                return tuple(seen)
    return tuple(seen)


def repository_fingerprints(root: Path) -> dict[str, Fingerprint]:
    """Each model folder's fingerprint, by name (folders whose name is no model name aside)."""
    found = {}
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and not entry.name.startswith((".", "_")):
            if not name_problem(entry.name):
                found[entry.name] = fingerprint(entry)
    return found


class RepositoryPoller:
    """Looks at the repository every `interval` seconds and applies what changed; runs on
    the scheduler's loop (start with `run()` as a task, stop by cancelling it)."""

    def __init__(self, registry: ModelRegistry, interval: float) -> None:
        self._registry = registry
        self._interval = interval
        self._last: dict[str, Fingerprint] = {}

    async def remember(self) -> None:
        """Takes the repository as it is now as the starting point (after the first load)."""
        self._last = await asyncio.to_thread(repository_fingerprints, self._registry.repository)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:  # a look that failed is retried at the next
                log.exception("polling the repository failed")

    async def poll(self) -> list[str]:
        """One look: applies what changed; the changes, as log lines say them."""
        now = await asyncio.to_thread(repository_fingerprints, self._registry.repository)
        changes = []
        for name in sorted(now.keys() | self._last.keys()):
            before, after = self._last.get(name), now.get(name)
            if before == after:
                continue
            if after is None:
                changes.append(await self._apply(name, "removed", self._registry.unload(name)))
            else:
                kind = "added" if before is None else "changed"
                changes.append(await self._apply(name, kind, self._registry.load(name)))
        self._last = now
        return changes

    async def _apply(self, name: str, kind: str, change: Awaitable[None]) -> str:
        try:
            await change
            line = f"model '{name}' {kind} in the repository: " + (
                "unloaded" if kind == "removed" else "loaded"
            )
            log.info("%s", line)
        except TiffinError as exc:
            line = f"model '{name}' {kind} in the repository, but: {exc.message}"
            log.error("%s", line)
        return line
