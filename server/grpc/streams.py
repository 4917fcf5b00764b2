"""One ModelStreamInfer stream: its requests read on a thread of their own, its responses
written in request order, and how far it may run ahead of its client.

`StreamSession` reads a stream's requests only while fewer than `window` of them are
unanswered: a client that stops reading its responses stops the server reading its
requests, and gRPC's flow control then stops the client. (How many streams may be open
at once is `capacity.StreamGate`'s.)

Nothing that crosses between a stream's two threads is a protobuf message or an
exception with a traceback: only strings, a `Pending` and a `Failure`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import grpc

from tiffin.protos.errors import TiffinError
from tiffin.protos.model_config import ModelConfig
from tiffin.scheduler import Pending
from tiffin.scheduler.context import RequestContext

from .decoder import Undecodable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failure:
    """Why a stream request got no response: the status and message to answer with."""

    code: grpc.StatusCode
    message: str


class StreamItem(NamedTuple):
    """A stream request in flight, in request order: what identifies it in the response,
    and its Pending (with the config that encodes its response) or why it failed."""

    id: str
    model_name: str
    model_version: str
    outcome: Pending | Failure
    config: ModelConfig | None = None
    context: RequestContext | None = None  # answered: finish() it with the status


# Starts one request: its Pending, the config it was checked against and its context;
# raises TiffinError.
Starter = Callable[[Any], tuple[Pending, ModelConfig, RequestContext]]
_END = object()
# What `next_item` returns once the server is shutting down and the requests read before
# that have been handed out: the stream ends then, whatever its client still sends.
SHUTDOWN = object()


class StreamSession:
    """One stream: a reader thread starts each request as it arrives, `next_item` hands
    them to the writer in request order, `answered` lets the reader take another."""

    def __init__(self, requests: Iterator[Any], start: Starter, window: int) -> None:
        self._requests = requests
        self._start = start
        self._items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # One token per request that may be read ahead of the responses written (a
        # SimpleQueue is a semaphore whose take and give cost next to nothing).
        self._slots: queue.SimpleQueue[None] = queue.SimpleQueue()
        for _ in range(window):
            self._slots.put(None)
        self._lock = threading.Lock()
        # Started and not yet answered, with their contexts: a stream that ends drops them,
        # and their contexts must still finish (limits per client give back their slots,
        # metrics count them).
        self._outstanding: dict[Pending, RequestContext] = {}
        self._closed = False

    def start(self) -> None:
        threading.Thread(target=self._read, name="stream-reader", daemon=True).start()

    def next_item(self, timeout: float | None) -> Any:
        """The next StreamItem; None once the client has sent its last one; SHUTDOWN once
        `shut_down` was called and what was read before has been handed out; queue.Empty
        when nothing arrived for `timeout` seconds while nothing was in flight."""
        item = self._items.get(timeout=timeout)
        return None if item is _END else item

    def shut_down(self) -> None:
        """The server is stopping: end the stream after the requests already read (which
        the server still answers), however long the client would keep it open."""
        self._items.put(SHUTDOWN)

    def settled(self, pending: Pending) -> None:
        """`pending` has its answer: cancelling the stream no longer needs to reach it."""
        with self._lock:
            self._outstanding.pop(pending, None)

    def answered(self) -> None:
        """One response has been written: the reader may take one more request."""
        self._slots.put(None)

    def close(self) -> None:
        """The stream ended (answered, aborted or cancelled): stop reading, drop what waits."""
        with self._lock:
            self._closed = True
            outstanding, self._outstanding = self._outstanding, {}
        self._slots.put(None)  # wakes a reader waiting for a slot, which then sees closed
        for pending, context in outstanding.items():
            pending.cancel()
            context.finish(grpc.StatusCode.CANCELLED.name)

    def _read(self) -> None:
        try:
            while True:
                self._slots.get()
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
            pending, config, context = self._start(message)
        except TiffinError as exc:
            return StreamItem(*ident, Failure(exc.code, exc.message))
        except Exception as exc:  # a bug: the request still gets its answer
            log.exception("a stream request could not be started")
            return StreamItem(*ident, Failure(grpc.StatusCode.INTERNAL, f"internal error: {exc}"))
        with self._lock:
            if self._closed:
                pending.cancel()
                context.finish(grpc.StatusCode.CANCELLED.name)
            else:
                self._outstanding[pending] = context
        return StreamItem(*ident, pending, config, context)
