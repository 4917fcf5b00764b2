"""A request on its way through the scheduler: queued, then answered, from any thread.

A front door's thread puts it in a model's queue and waits on it; whichever thread runs
its batch (an inline instance's thread, or the event loop for a worker instance) answers
it. Its wait is a raw lock, the cheapest wakeup CPython has: measured on one core, each
extra hop between threads cost more than decoding a request.
"""

from __future__ import annotations

import _thread
from collections.abc import Callable
from typing import Any

from tiffin.protos.errors import Cancelled

from .request import InferenceRequest, InferenceResponse


class Pending:
    """One request and, once it has one, its answer; `wait()` blocks until then.

    Queue bookkeeping (`level`, `delayed`, `queued`, `timers`) belongs to the batcher
    that holds it and is changed only under that batcher's lock.
    """

    __slots__ = (
        "request",
        "response",
        "error",
        "level",
        "delayed",
        "queued",
        "timers",
        "cancel_hook",
        "cancelled",
        "_done",
        "_settled",
        "_on_done",
    )

    def __init__(
        self,
        request: InferenceRequest,
        on_done: Callable[[Pending], None] | None = None,
    ) -> None:
        self.request = request
        self.response: InferenceResponse | None = None
        self.error: BaseException | None = None
        self.level = 0
        self.delayed = False  # its queue timeout expired under timeout_action DELAY
        self.queued = False  # True while it waits in a batcher's queue
        self.timers: list[Any] = []
        # Set by whoever holds it queued: how to take it out when its caller goes away.
        self.cancel_hook: Callable[[Pending], None] | None = None
        self.cancelled = False
        self._done = _thread.allocate_lock()
        self._done.acquire()
        self._settled = _thread.allocate_lock()  # taken once, by the first answer
        self._on_done = on_done

    def done(self) -> bool:
        return self._settled.locked()

    def finish(self, response: InferenceResponse | None, error: BaseException | None) -> bool:
        """Answers it, from any thread; False (and nothing changes) if it already has an
        answer. `on_done` runs here, on the answering thread."""
        if not self._settled.acquire(False):
            return False
        self.response, self.error = response, error
        self._done.release()
        if self._on_done is not None:
            self._on_done(self)
        return True

    def wait(self) -> InferenceResponse:
        """The response, or raises the request's error.

        The error is handed over, not kept: a Pending that still held the exception its
        caller's frame raised would make a reference cycle through that frame (and the
        request message in it), which only the cyclic garbage collector could free.
        """
        self._done.acquire()
        self._done.release()  # a second wait() returns at once
        error, self.error = self.error, None
        if error is not None:
            raise error
        assert self.response is not None
        return self.response

    def cancel(self) -> None:
        """The client went away (from any thread): drop the request if it still waits.

        gRPC calls this when every call ends, answered or not; an answered one costs nothing.
        A request already running finishes; its answer is then not read.
        """
        if self.done():
            return
        self.cancelled = True
        hook = self.cancel_hook
        if hook is not None:
            hook(self)

    def finish_cancelled(self) -> None:
        self.finish(None, Cancelled("the request was cancelled"))
