"""How many calls of each kind may run at once, so that no kind can take every thread.

The synchronous gRPC server serves each call on a handler thread, and refuses calls
beyond `--grpc-threads` (RESOURCE_EXHAUSTED). Inference calls, unary and streaming, may
hold only part of the threads (`InferenceSlots`), so that health checks, metadata and
repository calls always find one; streams, which hold a thread for as long as they stay
open, may hold only part of those, and only so many per connection (`StreamGate`).
"""

from __future__ import annotations

import threading

from tiffin.protos.errors import Overloaded


def reserved_threads(grpc_threads: int) -> int:
    """Handler threads kept for calls other than inference: an eighth, at least 2."""
    return min(max(2, grpc_threads // 8), grpc_threads - 1)


class InferenceSlots:
    """At most `limit` inference calls (unary requests and open streams) at once."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._slots = threading.BoundedSemaphore(limit)

    def take(self) -> None:
        """Takes a slot for one call; Overloaded (RESOURCE_EXHAUSTED) when none is free."""
        if not self._slots.acquire(blocking=False):
            raise Overloaded(
                f"the server is already running {self._limit} inference calls, its limit "
                "(--grpc-threads, less the threads kept for health checks); retry with backoff"
            )

    def give_back(self) -> None:
        self._slots.release()


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
