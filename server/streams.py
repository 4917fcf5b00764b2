"""ModelStreamInfer's two limits: how many streams may be open, and how far one stream may
run ahead of its client.

Each open stream holds a gRPC handler thread (it writes the responses) and a reader
thread of its own (so that its requests run concurrently). `StreamGate` keeps streams
to a share of the handler threads, so health checks and unary calls always find one,
and to a number per connection. `StreamSession` reads a stream's requests only while
fewer than `window` of them are unanswered: a client that stops reading its responses
stops the server reading its requests, and gRPC's flow control then stops the client.

Nothing that crosses between a stream's two threads is a protobuf message or an
exception with a traceback: only strings, a `Pending` and a `Failure`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from tiffin.protos.errors import Overloaded, TiffinError
from tiffin.protos.model_config import ModelConfig

from .bridge import Pending
from .wire import Undecodable

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Failure:
    """Why a stream request got no response: the status and message to answer with."""

    code: grpc.StatusCode
    message: str


@dataclass(frozen=True)
class StreamItem:
    """A stream request in flight, in request order: what identifies it in the response,
    and its Pending (with the config that encodes its response) or why it failed."""

    id: str
    model_name: str
    model_version: str
    outcome: Pending | Failure
    config: ModelConfig | None = None


# Starts one request: its Pending and the config it was checked against; raises TiffinError.
Starter = Callable[[Any], tuple[Pending, ModelConfig]]
_END = object()


class StreamSession:
    """One stream: a reader thread starts each request as it arrives, `next_item` hands
    them to the writer in request order, `answered` lets the reader take another."""

    def __init__(self, requests: Iterator[Any], start: Starter, window: int) -> None:
        self._requests = requests
        self._start = start
        self._items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._slots = threading.Semaphore(window)
        self._lock = threading.Lock()
        self._outstanding: set[Pending] = set()
        self._closed = False

    def start(self) -> None:
        threading.Thread(target=self._read, name="stream-reader", daemon=True).start()

    def next_item(self, timeout: float | None) -> StreamItem | None:
        """The next request, None once the client has sent its last one; queue.Empty when
        none arrived for `timeout` seconds while nothing was in flight."""
        item = self._items.get(timeout=timeout)
        return None if item is _END else item

    def settled(self, pending: Pending) -> None:
        """`pending` has its answer: cancelling the stream no longer needs to reach it."""
        with self._lock:
            self._outstanding.discard(pending)

    def answered(self) -> None:
        """One response has been written: the reader may take one more request."""
        self._slots.release()

    def close(self) -> None:
        """The stream ended (answered, aborted or cancelled): stop reading, drop what waits."""
        with self._lock:
            self._closed = True
            outstanding, self._outstanding = self._outstanding, set()
        self._slots.release()  # wakes a reader waiting for a slot, which then sees closed
        for pending in outstanding:
            pending.cancel()

    def _read(self) -> None:
        try:
            while True:
                self._slots.acquire()
                if self._closed:
                    return
                try:
                    message = next(self._requests)
                except StopIteration:
                    return
                except grpc.RpcError:  # cancelled or broken: nobody is left to answer
                    return
                self._items.put(self._begin(message))
                del message
        finally:
            self._items.put(_END)

    def _begin(self, message: Any) -> StreamItem:
        if isinstance(message, Undecodable):
            failure = Failure(grpc.StatusCode.INVALID_ARGUMENT, message.reason)
            return StreamItem("", "", "", failure)
        ident = (message.id, message.model_name, message.model_version)
        try:
            pending, config = self._start(message)
        except TiffinError as exc:
            return StreamItem(*ident, Failure(exc.code, exc.message))
        except Exception as exc:  # a bug: the request still gets its answer
            log.exception("a stream request could not be started")
            return StreamItem(*ident, Failure(grpc.StatusCode.INTERNAL, f"internal error: {exc}"))
        with self._lock:
            if self._closed:
                pending.cancel()
            else:
                self._outstanding.add(pending)
        return StreamItem(*ident, pending, config)
