"""Shared-memory arenas: the bytes a model instance's batches pass through.

The frontend creates (and alone unlinks) one arena per worker instance. Names carry
the creating server's pid, so that a server started after a crash can remove the
arenas of servers that no longer run. Segments are plain files under /dev/shm,
mapped with mmap: Python's resource tracker is not involved, so it cannot unlink an
arena behind the owner's back.
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PREFIX = "tiffin_"
_OWNER = re.compile(rf"^{PREFIX}(\d+)_")
ALIGNMENT = 64  # tensors start on cache-line boundaries
_SEQUENCE = itertools.count()  # a reloaded instance's arena must not collide with the old one


def align(offset: int) -> int:
    return (offset + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


class Arena:
    """A mapped shared-memory segment. `buffer` is a writable memoryview of all of it."""

    def __init__(self, name: str, size: int, fd: int, owner: bool) -> None:
        self.name = name
        self.size = size
        self._owner = owner
        self._map = mmap.mmap(fd, size)
        os.close(fd)
        self.buffer = memoryview(self._map)

    @classmethod
    def create(cls, label: str, size: int) -> Arena:
        """A new segment named after this process, a sequence number and `label`."""
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", label)
        name = f"{PREFIX}{os.getpid()}_{next(_SEQUENCE)}_{safe}"
        fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            os.unlink(SHM_DIR / name)
            raise
        return cls(name, size, fd, owner=True)

    @classmethod
    def attach(cls, name: str) -> Arena:
        """Maps a segment another process created."""
        fd = os.open(SHM_DIR / name, os.O_RDWR)
        return cls(name, os.fstat(fd).st_size, fd, owner=False)

    def close(self) -> None:
        """Unmaps (once no array views it any more) and, for the creator, unlinks."""
        try:
            self.buffer.release()
            self._map.close()
        except BufferError:
            pass  # an array still views it: the mapping goes with the last view
        if self._owner:
            try:
                os.unlink(SHM_DIR / self.name)
            except FileNotFoundError:
                pass


def remove_stale_arenas() -> list[str]:
    """Unlinks arenas whose creating process is gone (a server killed with SIGKILL)."""
    removed: list[str] = []
    if not SHM_DIR.is_dir():
        return removed
    for path in SHM_DIR.iterdir():
        match = _OWNER.match(path.name)
        if match is None or _alive(int(match.group(1))):
            continue
        try:
            path.unlink()
            removed.append(path.name)
        except OSError:
            pass
    if removed:
        log.warning(
            "removed %d shared-memory arena(s) left by a server that died: %s",
            len(removed),
            ", ".join(removed),
        )
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
