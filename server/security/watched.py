"""Files the server reads again when they change: token files, JWT keys, TLS certificates.

Operators rotate credentials by replacing files; the server notices without a restart. Each
`WatchedFiles` looks at its files' modification times at most once a second (a stat per file,
so it may sit on a hot path), and reads them again through its loader when any changed. A
loader that fails keeps the last good value serving, and the failure is logged once per change.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
RECHECK_SECONDS = 1.0


def _stamps(paths: Sequence[str]) -> tuple[tuple[int, int], ...]:
    stamps = []
    for path in paths:
        try:
            info = os.stat(path)
            stamps.append((info.st_mtime_ns, info.st_size))
        except OSError:
            stamps.append((0, 0))
    return tuple(stamps)


class WatchedFiles(Generic[T]):
    """`value()` is what `load()` made of the files, made again after they change.

    The first load happens in the constructor, and its error propagates: a server does not
    start on credentials it cannot read."""

    def __init__(self, paths: Sequence[str], load: Callable[[], T], what: str) -> None:
        self._paths = list(paths)
        self._load = load
        self._what = what
        self._lock = threading.Lock()
        self._stamps = _stamps(self._paths)
        self._value = load()
        self._checked = time.monotonic()
        self.reloads = 0  # how many times the files were read again (tests, logs)

    def value(self) -> T:
        now = time.monotonic()
        if now - self._checked >= RECHECK_SECONDS:
            self._check(now)
        return self._value

    def changed(self) -> bool:
        """Reads the files again if they changed since last looked at; True if the value is new."""
        return self._check(time.monotonic())

    def _check(self, now: float) -> bool:
        with self._lock:
            self._checked = now
            stamps = _stamps(self._paths)
            if stamps == self._stamps:
                return False
            self._stamps = stamps
            try:
                self._value = self._load()
            except Exception as exc:  # the old value keeps serving
                log.error(
                    "%s changed but cannot be used, the previous one stays: %s", self._what, exc
                )
                return False
            self.reloads += 1
            log.info("%s read again after a change", self._what)
            return True
