"""The server's log: plain text or one JSON object per line, and the sampled access log.

`configure_logging` sets up the root logger once, at `serverctl serve`'s start. A JSON line
has `timestamp` (ISO 8601, UTC), `level`, `logger` and `message`; a request event (an
access log line) adds `request_id`, `model`, `version`, `status`, `latency_ms`,
`protocol`, `operation` and `peer`. Request ids and model names are the client's: they are
cut to a bounded length. Tensors and request headers (the `authorization` header among
them) are never logged.
"""

from __future__ import annotations

import json
import logging
import random
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

from tiffin.protos.names import shown
from tiffin.scheduler.context import RequestContext

T = TypeVar("T")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# What a request event adds to its record (logging's `extra`), in this order.
REQUEST_FIELDS = (
    "request_id",
    "model",
    "version",
    "status",
    "latency_ms",
    "protocol",
    "operation",
    "peer",
)
# Health probes come every few seconds from every orchestrator: never access-logged.
_PROBES = ("live", "ready", "model_ready")

access_log = logging.getLogger("tiffin.access")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="microseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in REQUEST_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(level: str, log_format: str = "text") -> None:
    """Sends every log record to stderr, as text or JSON lines (`--log-format`)."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


class AccessLog:
    """The "access" interceptor: a share `sample` of calls (health probes excepted) get one
    log line on `tiffin.access` when answered. Its cost is one random number per call, and
    for a logged call one record."""

    def __init__(self, sample: float) -> None:
        self._sample = sample

    def intercept(self, context: RequestContext, proceed: Callable[[], T]) -> T:
        if context.operation not in _PROBES and (
            self._sample >= 1 or random.random() < self._sample
        ):
            context.on_finish.append(_log)
        return proceed()


def _log(context: RequestContext) -> None:
    timeline = context.timeline
    fields = {
        "request_id": shown(context.id, 100),
        "model": shown(context.model, 100),
        "version": context.version,
        "status": context.status,
        "latency_ms": round((timeline.sent - timeline.received) / 1e6, 3),
        "protocol": context.front_door,
        "operation": context.operation,
        "peer": context.peer,
    }
    access_log.info(
        "%s %s model=%s version=%s status=%s latency_ms=%s id=%s peer=%s",
        fields["protocol"],
        fields["operation"],
        fields["model"] or "-",
        fields["version"] or "-",
        fields["status"],
        fields["latency_ms"],
        fields["request_id"] or "-",
        fields["peer"] or "-",
        extra=fields,
    )
