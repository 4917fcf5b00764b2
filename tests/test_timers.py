"""The scheduler's timer thread: callbacks fire at their instant, cancelled ones never, and
cancelled timers do not pile up (every queued request with a deadline sets one)."""

from __future__ import annotations

import threading
import time

from tiffin.scheduler.timers import Timers


def test_a_timer_fires_at_its_instant_and_a_cancelled_one_never() -> None:
    timers = Timers()
    fired: list[str] = []
    done = threading.Event()
    start = time.monotonic()
    timers.at(start + 0.05, lambda tag: (fired.append(tag), done.set()), "kept")
    timers.at(start + 0.01, fired.append, "cancelled").cancel()
    assert done.wait(5)
    assert fired == ["kept"] and time.monotonic() - start >= 0.05


def test_cancelled_timers_do_not_accumulate() -> None:
    """20,000 timers an hour away, each cancelled (as a request's are when its batch
    runs): the heap is rebuilt without them and stays near the compaction size."""
    timers = Timers()
    later = time.monotonic() + 3600
    for _ in range(20_000):
        timers.at(later, print, "never").cancel()
    assert len(timers._heap) <= 2 * 1024
