"""DynamicBatcher on its own: how batches form, priorities, queue policies, deadlines."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from tiffin.protos.errors import (
    Cancelled,
    DeadlineExceeded,
    ModelNotReady,
    QueueFull,
    RequestTimeout,
)
from tiffin.protos.model_config import ModelConfig
from tiffin.scheduler import InferenceRequest, ModelKey, Pending
from tiffin.scheduler.batcher import DynamicBatcher

KEY = ModelKey("m", 1)


def config(max_batch_size: int = 8, **batching) -> ModelConfig:
    return ModelConfig.model_validate(
        {
            "backend": "onnxruntime",
            "max_batch_size": max_batch_size,
            "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1]}],
            "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1]}],
            **({"dynamic_batching": batching} if batching is not None else {}),
        }
    )


def request(rows: int = 1, width: int = 2, tag: str = "", **parameters) -> InferenceRequest:
    return InferenceRequest(
        KEY,
        {"INPUT0": np.zeros((rows, width), np.float32)},
        ["OUTPUT0"],
        id=tag,
        parameters=parameters,
        batch_size=rows,
    )


def rejecting(**policy) -> ModelConfig:
    """A config whose queue rejects a request after 50 ms (more of `policy` as given)."""
    return config(
        default_queue_policy={
            "default_timeout_microseconds": 50_000,
            "timeout_action": "REJECT",
            **policy,
        }
    )


def eventually(condition, seconds: float = 5) -> None:
    """Waits until `condition()` holds, for at most `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def queue(batcher: DynamicBatcher, **kwargs) -> Pending:
    """Puts a request made by `request(**kwargs)` in the batcher; its Pending."""
    pending = Pending(request(**kwargs))
    batcher.put(pending)
    return pending


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 10))


def ids(entries) -> list[str]:
    return [e.request.id for e in entries]


def test_without_dynamic_batching_each_request_is_its_own_batch():
    async def main():
        batcher = DynamicBatcher(KEY, ModelConfig.model_validate({"max_batch_size": 8}))
        for i in range(3):
            queue(batcher, tag=str(i))
        return [ids(await batcher.next_batch()) for _ in range(3)]

    assert run(main()) == [["0"], ["1"], ["2"]]


def test_zero_delay_takes_everything_queued_up_to_max_rows():
    async def main():
        batcher = DynamicBatcher(KEY, config(max_batch_size=4))
        for i in range(6):
            queue(batcher, tag=str(i))
        return ids(await batcher.next_batch()), ids(await batcher.next_batch())

    assert run(main()) == (["0", "1", "2", "3"], ["4", "5"])


def test_delay_waits_for_more_requests_then_cuts():
    async def main():
        batcher = DynamicBatcher(
            KEY, config(max_batch_size=8, max_queue_delay_microseconds=200_000)
        )
        queue(batcher, tag="a")

        async def later():
            await asyncio.sleep(0.05)
            queue(batcher, tag="b")

        asyncio.get_running_loop().create_task(later())
        start = time.monotonic()
        batch = await batcher.next_batch()
        return ids(batch), time.monotonic() - start

    batch, waited = run(main())
    assert batch == ["a", "b"]
    assert 0.15 <= waited < 1.0  # held until the delay passed, since 2 rows < 8


def test_full_batch_goes_without_waiting_for_the_delay():
    async def main():
        batcher = DynamicBatcher(
            KEY, config(max_batch_size=2, max_queue_delay_microseconds=5_000_000)
        )
        queue(batcher, tag="a")
        queue(batcher, tag="b")
        start = time.monotonic()
        return ids(await batcher.next_batch()), time.monotonic() - start

    batch, waited = run(main())
    assert batch == ["a", "b"] and waited < 0.5


def test_preferred_batch_size_is_cut_at_once():
    async def main():
        batcher = DynamicBatcher(
            KEY,
            config(
                max_batch_size=8, preferred_batch_size=[2], max_queue_delay_microseconds=5_000_000
            ),
        )
        for tag in "abc":
            queue(batcher, tag=tag)
        start = time.monotonic()
        return ids(await batcher.next_batch()), time.monotonic() - start

    batch, waited = run(main())
    assert batch == ["a", "b"] and waited < 0.5


def test_multi_row_requests_stay_whole():
    async def main():
        batcher = DynamicBatcher(KEY, config(max_batch_size=8))
        queue(batcher, rows=5, tag="five")
        queue(batcher, rows=4, tag="four")  # 9 rows would exceed 8
        queue(batcher, rows=3, tag="three")
        return ids(await batcher.next_batch()), ids(await batcher.next_batch())

    assert run(main()) == (["five"], ["four", "three"])


def test_requests_of_different_shapes_are_not_combined():
    async def main():
        batcher = DynamicBatcher(KEY, config(max_batch_size=8))
        queue(batcher, width=2, tag="a")
        queue(batcher, width=3, tag="b")
        queue(batcher, width=3, tag="c")
        return ids(await batcher.next_batch()), ids(await batcher.next_batch())

    assert run(main()) == (["a"], ["b", "c"])


def test_higher_priority_is_served_first():
    async def main():
        batcher = DynamicBatcher(
            KEY, config(max_batch_size=1, priority_levels=3, default_priority_level=2)
        )
        queue(batcher, tag="low", priority=3)
        queue(batcher, tag="default")
        queue(batcher, tag="high", priority=1)
        queue(batcher, tag="unknown level -> default", priority=9)
        return [ids(await batcher.next_batch())[0] for _ in range(4)]

    assert run(main()) == ["high", "default", "unknown level -> default", "low"]


def test_queue_full_is_refused_at_once():
    async def main():
        batcher = DynamicBatcher(KEY, config(default_queue_policy={"max_queue_size": 2}))
        queue(batcher)
        queue(batcher)
        with pytest.raises(QueueFull) as info:
            queue(batcher)
        return info.value

    error = run(main())
    assert error.code.name == "RESOURCE_EXHAUSTED" and "maximum queue size" in error.message


def test_queue_policy_per_priority_level():
    async def main():
        batcher = DynamicBatcher(
            KEY,
            config(
                priority_levels=2,
                default_priority_level=2,
                priority_queue_policy={1: {"max_queue_size": 1}},
            ),
        )
        queue(batcher, priority=1)
        with pytest.raises(QueueFull):
            queue(batcher, priority=1)
        for _ in range(5):  # level 2 has no limit
            queue(batcher, priority=2)
        return batcher.queued()

    assert run(main()) == 6


def test_timeout_reject_fails_the_waiting_request():
    async def main():
        batcher = DynamicBatcher(KEY, rejecting())
        pending = queue(batcher)
        with pytest.raises(RequestTimeout) as info:
            await asyncio.to_thread(pending.wait)
        return info.value, batcher.queued()

    error, queued = run(main())
    assert error.code.name == "UNAVAILABLE" and "Request timeout expired" in error.message
    assert queued == 0


def test_request_timeout_overrides_only_when_allowed():
    async def main(allow: bool):
        batcher = DynamicBatcher(
            KEY, config(default_queue_policy={"allow_timeout_override": allow})
        )
        pending = queue(batcher, timeout=30_000)
        await asyncio.sleep(0.2)
        return pending.done()

    assert run(main(True)) is True
    assert run(main(False)) is False


def test_timeout_delay_moves_the_request_behind_the_others():
    async def main():
        batcher = DynamicBatcher(
            KEY,
            config(
                max_batch_size=1,
                default_queue_policy={
                    "default_timeout_microseconds": 30_000,
                    "timeout_action": "DELAY",
                },
            ),
        )
        queue(batcher, tag="old")
        await asyncio.sleep(0.1)  # "old" has expired: it is delayed, not rejected
        queue(batcher, tag="new")
        return [ids(await batcher.next_batch())[0] for _ in range(2)]

    assert run(main()) == ["new", "old"]


def test_deadline_passed_in_the_queue_is_dropped_never_dispatched():
    async def main():
        batcher = DynamicBatcher(KEY, config(max_batch_size=1))
        late = Pending(request(tag="late"))
        late.request.deadline = time.monotonic() + 0.05
        batcher.put(late)
        queue(batcher, tag="on time")
        with pytest.raises(DeadlineExceeded):
            await asyncio.to_thread(late.wait)
        return ids(await batcher.next_batch())

    assert run(main()) == ["on time"]


def test_cancelled_request_leaves_the_queue():
    async def main():
        batcher = DynamicBatcher(KEY, config(max_batch_size=4))
        gone = queue(batcher, tag="gone")
        queue(batcher, tag="stays")
        gone.cancel()
        with pytest.raises(Cancelled):
            gone.wait()
        return batcher.queued(), ids(await batcher.next_batch())

    assert run(main()) == (1, ["stays"])


def test_a_thread_waits_for_its_batch_and_is_woken_by_a_put_from_another():
    batcher = DynamicBatcher(KEY, config(max_batch_size=4))
    taken: list[list[str]] = []

    def serve() -> None:
        while (batch := batcher.wait_batch()) is not None:
            taken.append(ids(batch))

    server = threading.Thread(target=serve)
    server.start()
    time.sleep(0.05)  # the thread waits on an empty queue
    queue(batcher, tag="a")
    eventually(lambda: taken)
    batcher.stop_serving()
    server.join(5)
    assert taken == [["a"]] and not server.is_alive()


def test_a_put_from_another_thread_wakes_a_task_on_the_loop():
    async def main():
        batcher = DynamicBatcher(KEY, config(max_batch_size=4))
        waiting = asyncio.get_running_loop().create_task(batcher.next_batch())
        await asyncio.sleep(0.05)  # the task waits on an empty queue
        await asyncio.to_thread(queue, batcher, tag="from a thread")
        return ids(await asyncio.wait_for(waiting, 5))

    assert run(main()) == ["from a thread"]


def test_a_closed_batcher_refuses_new_requests_and_keeps_those_queued():
    batcher = DynamicBatcher(KEY, config(max_batch_size=4))
    queue(batcher, tag="queued before")
    batcher.close(ModelNotReady("model 'm' version 1 is unloading"))
    with pytest.raises(ModelNotReady, match="unloading"):
        queue(batcher, tag="too late")
    assert ids(batcher.wait_batch() or []) == ["queued before"]


def test_requests_from_many_threads_are_each_served_once():
    """Eight threads put 2,000 requests while two threads take batches: each request is
    taken exactly once and nothing is left queued."""
    batcher = DynamicBatcher(KEY, config(max_batch_size=16))
    taken: list[str] = []
    lock = threading.Lock()

    def serve() -> None:
        while (batch := batcher.wait_batch()) is not None:
            with lock:
                taken.extend(ids(batch))

    def client(n: int) -> None:
        for i in range(250):
            queue(batcher, tag=f"{n}-{i}")

    servers = [threading.Thread(target=serve) for _ in range(2)]
    clients = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in servers + clients:
        thread.start()
    for thread in clients:
        thread.join(10)
    eventually(lambda: len(taken) >= 2000, 10)
    batcher.stop_serving()
    for thread in servers:
        thread.join(5)
    assert sorted(taken) == sorted(f"{n}-{i}" for n in range(8) for i in range(250))
    assert batcher.queued() == 0


def test_a_timeout_of_centuries_does_not_stop_the_other_timers():
    """A client may ask for any queue timeout (microseconds, 2**62 here): it is waited for
    in bounded steps, and a short timeout queued after it still fires on time."""
    batcher = DynamicBatcher(KEY, rejecting(allow_timeout_override=True))
    forever = queue(batcher, tag="forever", timeout=2**62)
    time.sleep(0.1)  # the timer thread now waits for the far one
    soon = queue(batcher, tag="soon")
    eventually(soon.done)
    assert soon.done(), "the timer thread stopped"
    with pytest.raises(RequestTimeout):
        soon.wait()
    assert not forever.done()
    forever.cancel()
