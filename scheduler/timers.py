"""One thread that runs callbacks at given instants, for queues fed from many threads.

The batcher's queue timeouts and client deadlines must fire while nobody touches the
queue (every instance busy with a long batch), and requests are queued from front-door
threads, not only from the event loop. One heap and one thread serve every model; a
request whose timer was cancelled costs a flag until its instant would have come, and
the heap is rebuilt without them once they are most of it.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# Below this many entries a heap full of cancelled timers is left to drain by itself.
_COMPACT_AT = 1024
# The longest single wait: a client may ask for a timeout of centuries, which a lock's
# wait refuses (OverflowError); the thread wakes, finds nothing due, and waits again.
_LONGEST_WAIT_SECONDS = 3600.0


class Timer:
    __slots__ = ("when", "callback", "argument", "cancelled")

    def __init__(self, when: float, callback: Callable[[Any], None], argument: Any) -> None:
        self.when = when
        self.callback = callback
        self.argument = argument
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.callback = self.argument = None  # type: ignore[assignment]  # drop references


class Timers:
    """`at(when, callback, argument)` runs `callback(argument)` on the timer thread at
    `when` (time.monotonic()), unless the returned Timer was cancelled first."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()
        self._changed = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None

    def at(self, when: float, callback: Callable[[Any], None], argument: Any) -> Timer:
        timer = Timer(when, callback, argument)
        with self._changed:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="timers", daemon=True)
                self._thread.start()
            heap = self._heap
            if len(heap) >= _COMPACT_AT and len(heap) % _COMPACT_AT == 0:
                self._compact()
            earliest = not heap or when < heap[0][0]
            heapq.heappush(heap, (when, next(self._order), timer))
            if earliest:
                self._changed.notify()
        return timer

    def _compact(self) -> None:
        live = [entry for entry in self._heap if not entry[2].cancelled]
        if len(live) * 2 < len(self._heap):
            heapq.heapify(live)
            self._heap = live

    def _run(self) -> None:
        while True:
            with self._changed:
                heap = self._heap
                while heap and heap[0][2].cancelled:
                    heapq.heappop(heap)
                if not heap:
                    self._changed.wait()
                    continue
                delay = heap[0][0] - time.monotonic()
                if delay > 0:
                    self._changed.wait(min(delay, _LONGEST_WAIT_SECONDS))
                    continue
                timer = heapq.heappop(heap)[2]
            # Read before the callback: cancel() clears the callback first, so a timer
            # cancelled meanwhile shows a None in one of them (or was cancelled after both
            # were read, which its callback must allow: the batcher's check their request).
            argument = timer.argument
            callback = timer.callback
            if callback is None or argument is None:
                continue
            try:
                callback(argument)
            except Exception:  # one bad callback must not stop every other timer
                log.exception("a scheduler timer failed")


TIMERS = Timers()
