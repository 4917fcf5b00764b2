"""Limits per client: requests in flight at once, and requests per second (a token bucket).

A client is its principal once authentication is on, and otherwise its network address (the
peer without its port), so one caller cannot take the whole server from the others. Over a
limit, the call is answered RESOURCE_EXHAUSTED at once, naming the limit; nothing queues.

Clients are remembered in a bounded table: when it is full, clients with nothing in flight
and a full bucket (those a fresh entry would treat the same) are forgotten first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from tiffin.protos.errors import Overloaded
from tiffin.scheduler.context import RequestContext

T = TypeVar("T")
MAX_CLIENTS = 100_000


def client_key(context: RequestContext) -> str:
    """Who a limit applies to: the principal, or the peer's address without its port."""
    if context.principal:
        return "principal " + context.principal
    peer = context.peer  # host:port, [v6 host]:port
    host = peer.rsplit(":", 1)[0] if peer.count(":") == 1 or peer.startswith("[") else peer
    return "address " + (host.strip("[]") or "unknown")


class _Client:
    __slots__ = ("inflight", "tokens", "stamp")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.inflight = 0
        self.tokens = tokens
        self.stamp = stamp


class ClientLimits:
    """The limits slot's interceptor."""

    def __init__(self, max_inflight: int, max_rps: float, burst: int) -> None:
        self._max_inflight = max_inflight
        self._rate = max_rps
        self._burst = float(burst or max(1, round(max_rps)))
        self._clients: dict[str, _Client] = {}
        self._lock = threading.Lock()

    def __call__(self, context: RequestContext, proceed: Callable[[], T]) -> T:
        key = client_key(context)
        self._admit(key)
        if not self._max_inflight:
            return proceed()
        # A request's answer comes later than proceed() returns (infer hands back a pending
        # answer), so its slot is given back when the call finishes.
        released = False

        def release(_: RequestContext | None = None) -> None:
            nonlocal released
            if not released:
                released = True
                with self._lock:
                    self._clients[key].inflight -= 1

        context.on_finish.append(release)
        try:
            return proceed()
        except BaseException:
            release()
            raise

    def _admit(self, key: str) -> None:
        now = time.monotonic()
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                if len(self._clients) >= MAX_CLIENTS:
                    self._forget_idle(now)
                client = self._clients[key] = _Client(self._burst, now)
            if self._rate:
                client.tokens = min(self._burst, client.tokens + (now - client.stamp) * self._rate)
                client.stamp = now
                if client.tokens < 1.0:
                    raise Overloaded(
                        f"{key.split(' ', 1)[1]!r} sends more than {self._rate:g} requests per "
                        "second (--client-max-rps); slow down and retry"
                    )
            if self._max_inflight and client.inflight >= self._max_inflight:
                raise Overloaded(
                    f"{key.split(' ', 1)[1]!r} already has {client.inflight} requests in flight, "
                    "its most (--client-max-inflight); wait for an answer before sending more"
                )
            if self._rate:
                client.tokens -= 1.0
            if self._max_inflight:
                client.inflight += 1

    def _forget_idle(self, now: float) -> None:
        for key in [
            k
            for k, c in self._clients.items()
            if not c.inflight and c.tokens + (now - c.stamp) * self._rate >= self._burst
        ]:
            del self._clients[key]
        if len(self._clients) >= MAX_CLIENTS:  # all busy: still bounded
            raise Overloaded("the server is tracking too many clients at once; retry later")
