"""How many streams may be open at once, so that streams cannot take every thread.

The synchronous gRPC server serves each call on a handler thread and refuses calls beyond
`--grpc-threads` (RESOURCE_EXHAUSTED), cheaply, before any handler runs: under unary
overload that refusal is what sheds load. A stream holds its thread for as long as it
stays open, so streams may hold only part of the threads, and only so many per
connection (`StreamGate`): health checks and unary calls always find one.

(A limit of Tiffin's own on unary calls would refuse inside a handler thread, which
measured twice as costly per refusal as gRPC's and cut goodput at 2x load from 0.91 to
0.58 of capacity; so there is none.)
"""

from __future__ import annotations

import threading

from tiffin.protos.errors import Overloaded

from .streams import StreamSession


class StreamGate:
    """The open streams: admits one while fewer than `max_streams` are open in all, and fewer
    than `per_connection` on its own connection; ends them all at shutdown."""

    def __init__(self, max_streams: int, per_connection: int) -> None:
        self._max = max_streams
        self._per_connection = per_connection
        self._lock = threading.Lock()
        self._open: dict[StreamSession, str] = {}  # session -> its connection (peer)

    def enter(self, peer: str, session: StreamSession) -> None:
        """Counts a new stream; Overloaded (RESOURCE_EXHAUSTED) when a limit is reached."""
        with self._lock:
            if len(self._open) >= self._max:
                raise Overloaded(
                    f"the server already has {self._max} streams open, its limit "
                    "(--max-streams); retry later, or send unary requests"
                )
            on_peer = sum(1 for p in self._open.values() if p == peer)
            if on_peer >= self._per_connection:
                raise Overloaded(
                    f"this connection already has {on_peer} streams open, the limit per "
                    "connection (--max-streams-per-connection); close one first"
                )
            self._open[session] = peer

    def leave(self, session: StreamSession) -> None:
        with self._lock:
            self._open.pop(session, None)

    def shut_down(self) -> None:
        """Shutdown: every open stream ends once the requests it already read are answered,
        so that idle streams do not hold the server for its whole grace period."""
        with self._lock:
            sessions = list(self._open)
        for session in sessions:
            session.shut_down()
