"""The chain every call passes on its way into the data plane, from either front door.

Each call (and each request of a stream) runs `Chain.run(context, operation)`: the
interceptors installed in the chain's slots, in the order of `SLOTS`, then the operation.
An interceptor is a callable `(context, proceed) -> result` that may look at the call's
`RequestContext`, refuse it by raising a TiffinError, or wrap what `proceed()` does.

The "errors" slot is always filled: whatever escapes the rest of the chain leaves it as a
TiffinError, so front doors only ever map TiffinErrors to their statuses, and a bug is
logged with its traceback and answered INTERNAL rather than lost. The other slots are the
named places where later features plug in; an empty slot costs nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol, TypeVar

from tiffin.protos.errors import BackendError, TiffinError
from tiffin.protos.names import shown
from tiffin.scheduler.context import RequestContext

log = logging.getLogger(__name__)

T = TypeVar("T")

# Outermost first: errors wrap everything; the access log sees every call, refused ones too;
# who the caller is comes before what they may do, audit records decisions, metrics and
# tracing measure what runs, limits guard the work.
SLOTS = (
    "errors",
    "access",
    "authentication",
    "authorization",
    "audit",
    "metrics",
    "tracing",
    "limits",
)


class Interceptor(Protocol):
    def __call__(self, context: RequestContext, proceed: Callable[[], T]) -> T: ...


class InternalError(BackendError):
    """A bug in the server, reported to the caller as INTERNAL with its message."""


def map_errors(context: RequestContext, proceed: Callable[[], T]) -> T:
    """Lets TiffinErrors through; turns anything else into an INTERNAL TiffinError."""
    try:
        return proceed()
    except TiffinError:
        raise
    except Exception as exc:
        log.exception("%s (%s) failed", context.operation, context.front_door)
        raise InternalError(shown(f"{context.operation} failed: {exc}", 1000)) from None


class Chain:
    """The installed interceptors, outermost first."""

    def __init__(self) -> None:
        self._slots: dict[str, Interceptor] = {"errors": map_errors}
        self._order: list[Interceptor] = [map_errors]

    def install(self, slot: str, interceptor: Interceptor) -> None:
        """Puts `interceptor` in its named slot (replacing what was there)."""
        if slot not in SLOTS:
            raise ValueError(f"unknown interceptor slot '{slot}'; slots are {', '.join(SLOTS)}")
        self._slots[slot] = interceptor
        self._order = [self._slots[s] for s in SLOTS if s in self._slots]

    def run(self, context: RequestContext, operation: Callable[[], T]) -> T:
        """Runs `operation` inside every installed interceptor."""
        call = operation
        for interceptor in reversed(self._order):
            call = _bind(interceptor, context, call)
        return call()


def _bind(
    interceptor: Interceptor, context: RequestContext, inner: Callable[[], T]
) -> Callable[[], T]:
    return lambda: interceptor(context, inner)
