"""The audit log: one JSON line per admin call attempted and per refused caller.

Each line has the time (UTC, ISO 8601), the principal, the peer address, the front door, the
call, the target model and version, the outcome ("allowed", "refused", "failed", "ok") and the
reason. Never a tensor, never a token: only what this module is given, and it is given no
headers. Lines are appended and fsync'd before the call goes on, so a record survives a
crash; the file is rotated by size (FILE.1 ... FILE.N, oldest dropped).

Refusals come from clients, so a hostile one could make many: they are written like the
others, and the rotation bounds the disk they take.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path

from tiffin.scheduler.context import RequestContext

log = logging.getLogger(__name__)

_MAX_FIELD_CHARS = 512  # a client's strings (model names, reasons) are cut to this


def _cut(value: str) -> str:
    return value if len(value) <= _MAX_FIELD_CHARS else value[:_MAX_FIELD_CHARS] + "..."


class AuditLog:
    """Appends audit records to a file, rotating it by size."""

    def __init__(self, path: str, max_bytes: int, backups: int) -> None:
        self.path = Path(path)
        self._max_bytes = max_bytes
        self._backups = backups
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")  # noqa: SIM115 - held open for the server's life
        os.chmod(self.path, 0o600)  # who did what is for operators only

    def record(self, context: RequestContext, outcome: str, reason: str = "") -> bool:
        """Writes one line for the call in `context`; False if it could not be written."""
        line = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "principal": _cut(context.principal),
            "peer": _cut(context.peer),
            "front_door": context.front_door,
            "call": context.operation,
            "model": _cut(context.model),
            "version": _cut(context.version),
            "outcome": outcome,
            "reason": _cut(reason),
        }
        data = (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8", "replace")
        with self._lock:
            try:
                if self._file.tell() + len(data) > self._max_bytes:
                    self._rotate()
                self._file.write(data)
                self._file.flush()
                os.fsync(self._file.fileno())
                return True
            except (OSError, ValueError) as exc:  # a full disk must not stop inference
                log.error("audit log %s not written: %s", self.path, exc)
                return False

    def _rotate(self) -> None:
        self._file.close()
        for index in range(self._backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._file = open(self.path, "ab")  # noqa: SIM115
        os.chmod(self.path, 0o600)

    def close(self) -> None:
        with self._lock:
            self._file.close()
