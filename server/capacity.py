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


class StreamGate:
    """Admits a stream while fewer than `max_streams` are open in all, and fewer than
    `per_connection` on the stream's own connection."""

    def __init__(self, max_streams: int, per_connection: int) -> None:
        self._max = max_streams
        self._per_connection = per_connection
        self._lock = threading.Lock()
        self._open = 0
        self._by_peer: dict[str, int] = {}

    def enter(self, peer: str) -> None:
        """Counts a new stream; Overloaded (RESOURCE_EXHAUSTED) when a limit is reached."""
        with self._lock:
            if self._open >= self._max:
                raise Overloaded(
                    f"the server already has {self._max} streams open, its limit "
                    "(--max-streams); retry later, or send unary requests"
                )
            on_peer = self._by_peer.get(peer, 0)
            if on_peer >= self._per_connection:
                raise Overloaded(
                    f"this connection already has {on_peer} streams open, the limit per "
                    "connection (--max-streams-per-connection); close one first"
                )
            self._open += 1
            self._by_peer[peer] = on_peer + 1

    def leave(self, peer: str) -> None:
        with self._lock:
            self._open -= 1
            left = self._by_peer[peer] - 1
            if left:
                self._by_peer[peer] = left
            else:
                del self._by_peer[peer]

    @property
    def open(self) -> int:
        return self._open
