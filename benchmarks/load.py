"""The load generator: closed and open loop, unary and streaming, over gRPC or REST.

  closed loop  N concurrent clients; each sends a batch-1 request, waits for the answer and
               sends the next. Streaming spreads the N over `streams` ModelStreamInfer calls
               (N/streams requests in flight on each), as perf_analyzer does.
  open loop    Poisson arrivals at a target rate, whatever the server does; latency counts
               from each request's scheduled time, so overload shows as growing latency and an
               achieved rate below the offered one.

Every run warms up, then measures a window; only answers that arrive inside it count. Runs are
bounded in time (`duration`, plus `timeout` per request) and optionally in measured requests.
Failures are counted by status code. `procs` > 1 splits the load over that many processes
(spawned, sharing one measurement window) for when one client process cannot drive the server.
Run as `python -m benchmarks load --url 127.0.0.1:8001 --model mlp --concurrency 8 --json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from array import array
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from typing import Any

from .clients import CLIENTS, UNARY_ONLY, Client, RequestFailed, Stream, make_client
from .models import spec as model_spec

HELP = "Drive one server with a closed or open loop of requests and print the figures."

MODES = ("unary", "streaming")
DEFAULT_STREAMS = 4  # perf_analyzer's default: 4 worker threads, one stream each
MAX_IN_FLIGHT = 10_000  # open loop: beyond this the client sheds arrivals (CLIENT_OVERLOAD)
PROCESS_START_S = 2.0  # how long spawned processes get to import and connect
now = time.monotonic  # CLOCK_MONOTONIC: one clock for every process on the machine


@dataclass(frozen=True)
class LoadSpec:
    """One load run against one server, model, mode and client."""

    url: str
    model: str
    mode: str = "unary"
    client: str = "lean"
    concurrency: int | None = 1  # closed loop; None with `rate` for an open loop
    rate: float | None = None  # open loop: mean arrivals per second
    duration: float = 10.0
    warmup: float = 3.0
    max_requests: int | None = None  # stop measuring after this many answers
    streams: int = DEFAULT_STREAMS  # streaming: calls carrying the load (at most concurrency)
    timeout: float = 30.0  # per request
    procs: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        if self.client not in CLIENTS:
            raise ValueError(f"client must be one of {', '.join(CLIENTS)}, got '{self.client}'")
        if self.client in UNARY_ONLY and self.mode != "unary":
            raise ValueError(f"the {self.client} client sends unary requests only")
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of concurrency (closed loop) and rate (open loop)")


class Recorder:
    """Answers and failures inside the measurement window [start, end)."""

    def __init__(self, start: float, end: float, max_requests: int | None) -> None:
        self.start, self.end = start, end
        self.max_requests = max_requests
        self.latencies = array("d")
        self.errors: Counter[str] = Counter()
        self.offered = 0

    def stopped(self) -> bool:
        return now() >= self.end

    def arrival(self, scheduled: float) -> None:
        if self.start <= scheduled < self.end:
            self.offered += 1

    def record(self, sent: float, done: float, code: str | None = None) -> None:
        if not (self.start <= done < self.end):
            return
        if code is None:
            self.latencies.append(done - sent)
            if self.max_requests is not None and len(self.latencies) >= self.max_requests:
                self.end = done  # the window closes at the last counted answer
        else:
            self.errors[code] += 1


# ---- closed loop -------------------------------------------------------------------------


async def _closed_unary(client: Client, rec: Recorder, timeout: float) -> None:
    while not rec.stopped():
        sent = now()
        code = None
        try:
            await client.unary(timeout)
        except RequestFailed as exc:
            code = exc.code
        rec.record(sent, now(), code)


async def _closed_stream(client: Client, rec: Recorder, in_flight: int, timeout: float) -> None:
    """One stream keeping `in_flight` requests outstanding; reopened if it breaks."""
    while not rec.stopped():
        stream = await client.open_stream()
        sent: deque[float] = deque()
        try:
            for _ in range(in_flight):
                sent.append(now())
                await stream.send()
            while sent:
                code = None
                try:
                    await asyncio.wait_for(stream.recv(), timeout)
                except TimeoutError:
                    raise RequestFailed("DEADLINE_EXCEEDED", fatal=True) from None
                except RequestFailed as exc:
                    if exc.fatal:
                        raise
                    code = exc.code
                rec.record(sent.popleft(), now(), code)
                if not rec.stopped():
                    sent.append(now())
                    await stream.send()
        except RequestFailed as exc:
            done = now()
            for t in sent:
                rec.record(t, done, exc.code)
            await asyncio.sleep(0.01)  # a broken server must not turn this into a busy loop
        finally:
            await stream.close()


# ---- open loop ---------------------------------------------------------------------------


def _arrival_times(rate: float, first: float, end: float, seed: int) -> Any:
    rng = random.Random(seed)
    t = first
    while True:
        t += rng.expovariate(rate)
        if t >= end:
            return
        yield t


async def _sleep_until(t: float) -> None:
    delay = t - now()
    if delay > 0:
        await asyncio.sleep(delay)


async def _open_unary(client: Client, rec: Recorder, spec: LoadSpec, first: float) -> None:
    tasks: set[asyncio.Task[None]] = set()

    async def one(scheduled: float) -> None:
        code = None
        try:
            await client.unary(spec.timeout)
        except RequestFailed as exc:
            code = exc.code
        rec.record(scheduled, now(), code)

    assert spec.rate is not None
    for scheduled in _arrival_times(spec.rate, first, rec.end, spec.seed):
        await _sleep_until(scheduled)
        if rec.stopped():
            break
        rec.arrival(scheduled)
        if len(tasks) >= MAX_IN_FLIGHT:
            rec.record(scheduled, scheduled, "CLIENT_OVERLOAD")
            continue
        task = asyncio.create_task(one(scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await _drain(tasks, spec.timeout)


class _OpenStream:
    """A stream fed by arrivals: a writer sends queued requests, a reader records answers."""

    def __init__(self, stream: Stream, rec: Recorder) -> None:
        self.stream, self.rec = stream, rec
        self.queue: asyncio.Queue[float | None] = asyncio.Queue()
        self.sent: deque[float] = deque()
        self.ready = asyncio.Semaphore(0)  # released once per request sent, and at the end
        self.finished = False
        self.broken: str | None = None

    def outstanding(self) -> int:
        return self.queue.qsize() + len(self.sent)

    async def write(self) -> None:
        while (scheduled := await self.queue.get()) is not None:
            if self.broken:
                self.rec.record(scheduled, now(), self.broken)
                continue
            self.sent.append(scheduled)
            self.ready.release()
            try:
                await self.stream.send()
            except RequestFailed as exc:
                self.broken = exc.code
        self.finished = True
        self.ready.release()

    async def read(self, timeout: float) -> None:
        while True:
            await self.ready.acquire()
            if not self.sent:
                if self.finished:
                    return
                continue
            code = None
            if not self.broken:
                try:
                    await asyncio.wait_for(self.stream.recv(), timeout)
                except TimeoutError:
                    code = self.broken = "DEADLINE_EXCEEDED"
                except RequestFailed as exc:
                    code = exc.code
                    if exc.fatal:
                        self.broken = code
            if self.broken:
                done = now()
                while self.sent:
                    self.rec.record(self.sent.popleft(), done, self.broken)
                continue
            self.rec.record(self.sent.popleft(), now(), code)


async def _open_streaming(client: Client, rec: Recorder, spec: LoadSpec, first: float) -> None:
    assert spec.rate is not None
    streams = [_OpenStream(await client.open_stream(), rec) for _ in range(spec.streams)]
    workers = [asyncio.create_task(s.write()) for s in streams]
    readers = [asyncio.create_task(s.read(spec.timeout)) for s in streams]
    for i, scheduled in enumerate(_arrival_times(spec.rate, first, rec.end, spec.seed)):
        await _sleep_until(scheduled)
        if rec.stopped():
            break
        rec.arrival(scheduled)
        target = streams[i % len(streams)]
        if target.outstanding() >= MAX_IN_FLIGHT // len(streams):
            rec.record(scheduled, scheduled, "CLIENT_OVERLOAD")
            continue
        target.queue.put_nowait(scheduled)
    for s in streams:
        s.queue.put_nowait(None)
    await _drain(set(workers + readers), spec.timeout)
    for s in streams:
        await s.stream.close()


async def _drain(tasks: set[asyncio.Task[None]], timeout: float) -> None:
    """Waits for outstanding requests (their answers may still count), then cancels."""
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


# ---- one process -------------------------------------------------------------------------


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def _run(spec: LoadSpec, start_at: float | None) -> dict:
    client = make_client(spec.client, spec.url, model_spec(spec.model))
    try:
        if start_at is not None:
            await _sleep_until(start_at)
        first = now()
        start = first + spec.warmup
        rec = Recorder(start, start + spec.duration, spec.max_requests)
        if spec.concurrency is not None:
            if spec.mode == "unary":
                work = [_closed_unary(client, rec, spec.timeout) for _ in range(spec.concurrency)]
            else:
                streams = max(1, min(spec.streams, spec.concurrency))
                work = [
                    _closed_stream(client, rec, n, spec.timeout)
                    for n in _split(spec.concurrency, streams)
                    if n
                ]
            tasks = {asyncio.create_task(w) for w in work}
            # Workers stop sending when the window ends (at the duration, or earlier at
            # max_requests); answers still on the way may count.
            while not rec.stopped():
                await asyncio.sleep(min(0.05, max(0.0, rec.end - now())))
            await _drain(tasks, spec.timeout)
        elif spec.mode == "unary":
            await _open_unary(client, rec, spec, first)
        else:
            await _open_streaming(client, rec, spec, first)
    finally:
        await client.close()
    return {
        "latencies": rec.latencies.tobytes(),
        "errors": dict(rec.errors),
        "offered": rec.offered,
        "window": (rec.start, rec.end),
    }


def _run_in_process(spec: LoadSpec, start_at: float) -> dict:
    return asyncio.run(_run(spec, start_at))


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def summarise(spec: LoadSpec, parts: list[dict]) -> dict:
    """Merges per-process outcomes into the figures a report shows."""
    latencies: array[float] = array("d")
    errors: Counter[str] = Counter()
    offered = 0
    for part in parts:
        latencies.frombytes(part["latencies"])
        errors.update(part["errors"])
        offered += part["offered"]
    start = min(p["window"][0] for p in parts)
    end = max(p["window"][1] for p in parts)
    duration = max(end - start, 1e-9)
    ms = sorted(v * 1e3 for v in latencies)
    result: dict[str, Any] = {
        "spec": asdict(spec),
        "requests": len(ms),
        "duration_s": duration,
        "throughput": len(ms) / duration,
        "errors": dict(errors),
        "error_count": sum(errors.values()),
        "latency_ms": {
            "p50": _percentile(ms, 50),
            "p90": _percentile(ms, 90),
            "p99": _percentile(ms, 99),
            "mean": sum(ms) / len(ms),
            "max": ms[-1],
        }
        if ms
        else None,
    }
    if spec.rate is not None:
        result["offered_rate"] = offered / duration
    return result


def run_load(spec: LoadSpec) -> dict:
    """Runs one load (in this process, or split over `spec.procs` spawned ones) and
    returns its summary."""
    if spec.procs <= 1:
        return summarise(spec, [asyncio.run(_run(spec, None))])
    shares = []
    for i in range(spec.procs):
        share: dict[str, Any] = {"procs": 1, "seed": spec.seed + i}
        if spec.concurrency is not None:
            share["concurrency"] = _split(spec.concurrency, spec.procs)[i]
            share["streams"] = max(1, _split(spec.streams, spec.procs)[i])
        else:
            assert spec.rate is not None
            share["rate"] = spec.rate / spec.procs
            share["streams"] = max(1, _split(spec.streams, spec.procs)[i])
        shares.append(replace(spec, **share))
    shares = [s for s in shares if s.concurrency != 0]
    start_at = now() + PROCESS_START_S
    with ProcessPoolExecutor(len(shares), mp_context=get_context("spawn")) as pool:
        parts = list(pool.map(_run_in_process, shares, [start_at] * len(shares)))
    return summarise(spec, parts)


def format_result(result: dict) -> str:
    """One line: req/s, latency percentiles, errors."""
    lat = result["latency_ms"]
    text = f"{result['throughput']:8.0f} req/s"
    if "offered_rate" in result:
        text += f" (offered {result['offered_rate']:.0f}/s)"
    if lat:
        text += f"  p50 {lat['p50']:.3f}  p90 {lat['p90']:.3f}  p99 {lat['p99']:.3f} ms"
    if result["error_count"]:
        text += f"  errors {result['errors']}"
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="host:port of the server (loopback)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--mode", choices=MODES, default="unary")
    parser.add_argument("--client", choices=CLIENTS, default="lean")
    loop = parser.add_mutually_exclusive_group()
    loop.add_argument("--concurrency", type=int, help="closed loop with N clients (default 1)")
    loop.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument("--max-requests", type=int, default=None, help="stop after N answers")
    parser.add_argument("--streams", type=int, default=DEFAULT_STREAMS)
    parser.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    parser.add_argument("--procs", type=int, default=1, help="client processes")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")


def spec_from_arguments(args: argparse.Namespace) -> LoadSpec:
    host = args.url.rsplit(":", 1)[0]
    if host not in ("127.0.0.1", "localhost", "[::1]", "::1"):
        raise SystemExit(f"the load generator only drives loopback servers, not '{host}'")
    return LoadSpec(
        url=args.url,
        model=args.model,
        mode=args.mode,
        client=args.client,
        concurrency=None if args.rate is not None else (args.concurrency or 1),
        rate=args.rate,
        duration=args.duration,
        warmup=args.warmup,
        max_requests=args.max_requests,
        streams=args.streams,
        timeout=args.timeout,
        procs=args.procs,
    )


def main(args: argparse.Namespace) -> int:
    result = run_load(spec_from_arguments(args))
    if args.json:
        json.dump(result, sys.stdout)
        print()
    else:
        print(format_result(result))
    return 0
