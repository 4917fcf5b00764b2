"""`python -m benchmarks overload`: goodput at a multiple of capacity, open loop, with deadlines.

  1. writes the model repository and starts `serverctl serve` pinned to the server cpus;
  2. measures capacity: closed-loop throughput at a saturating concurrency (64 clients), with
     `python -m benchmarks load` pinned to the client cpus;
  3. offers Poisson arrivals at `--overload` x capacity for `--duration` s, then at
     `--recovery-load` x capacity for `--recovery-duration` s, back to back; every request
     carries a deadline `--deadline-ms` after its scheduled time;
  4. reads the server's ModelStatistics before and after (once it has stopped working) to show
     how much of its work reached a caller in time;
  5. writes overload.json and overload.md into --out, prints the table and a pass/fail line
     against the target in BENCHMARKS.md.

The generator (`Share`, `_generate`) runs in spawned processes on the client cpus: grpc.aio with
one pre-serialized request (the lean client). Each request is sent at its scheduled time, not
after the previous answer, and its timeout is what is left of its deadline, so no backlog can
build on the client side; how late sends were (lag) is measured and reported. The figures are
computed by `overload_report`.

A Python generator costs about 250 µs of cpu per request on a 2-core cloud VM, so one core
offers about 4k req/s; above that it falls behind and the report says so. More processes help
only with more client cpus (`--client-cpus 0,2`: one process per cpu by default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from array import array
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from . import environment, servers
from .clients import LeanClient, RequestFailed
from .limit import parse_cpus
from .models import (
    DEFAULT_REPOSITORY,
    add_repository_arguments,
    repository_options,
    write_repository,
)
from .models import spec as model_spec
from .overload_report import NOT_SENT, Phase, Records, summarise, write_all

HELP = "Offer 2x capacity open loop with deadlines; report goodput, status codes and recovery."

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROCESS_START_S = 3.0  # spawned generators import grpc, connect and warm up before this
DRAIN_S = 5.0  # beyond its deadline, how long a request may take to report back
SETTLE_S = 60.0  # the longest wait for the server to finish the work it queued
now = time.monotonic  # one clock for every process on the machine


# ---- the generator (spawned processes) ---------------------------------------------------


@dataclass(frozen=True)
class Share:
    """One generator process's part of the open loop."""

    url: str
    model: str
    phases: tuple[tuple[float, float], ...]  # (arrivals per second, seconds), back to back
    deadline_s: float
    seed: int


def arrivals(phases: tuple[tuple[float, float], ...], start: float, seed: int) -> Iterator[float]:
    """Poisson arrival times, phase after phase (exponential gaps are memoryless, so each
    phase simply restarts at its own beginning)."""
    rng = random.Random(seed)
    begin = start
    for rate, seconds in phases:
        end, t = begin + seconds, begin
        while rate > 0:
            t += rng.expovariate(rate)
            if t >= end:
                break
            yield t
        begin = end


async def _generate(share: Share, start_at: float) -> dict:
    client = LeanClient(share.url, model_spec(share.model))
    scheduled, sent, done = array("d"), array("d"), array("d")
    codes: list[str] = []
    details: dict[str, str] = {}  # the first message of each failure code

    async def one(t: float) -> None:
        began = now()
        code = NOT_SENT
        try:
            remaining = t + share.deadline_s - began
            if remaining > 0:  # sent late by a whole deadline: the caller would have given up
                await client.unary(remaining)
                code = "OK"
        except RequestFailed as exc:
            code = exc.code
            details.setdefault(code, str(exc)[:300])
        except asyncio.CancelledError:
            code = "GENERATOR_CANCELLED"
            raise
        finally:
            scheduled.append(t)
            sent.append(began)
            done.append(now())
            codes.append(code)

    tasks: set[asyncio.Task[None]] = set()
    try:
        try:  # connects the channel and checks the answer; not part of the figures
            await client.unary(10.0)
            warmed = 1
        except RequestFailed:
            warmed = 0
        delay = start_at - now()
        if delay > 0:
            await asyncio.sleep(delay)
        cpu = time.process_time()
        for t in arrivals(share.phases, start_at, share.seed):
            delay = t - now()
            await asyncio.sleep(delay if delay > 0 else 0)  # always yields: answers get read
            task = asyncio.create_task(one(t))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            # Every request has a timeout, so this returns by the last deadline.
            _, pending = await asyncio.wait(tasks, timeout=share.deadline_s + DRAIN_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        cpu = time.process_time() - cpu
        wall = now() - start_at
    finally:
        await client.close()
    return {
        "cpu_s": cpu,
        "wall_s": wall,
        "details": details,
        "scheduled": scheduled.tobytes(),
        "sent": sent.tobytes(),
        "done": done.tobytes(),
        "codes": codes,
        "warmed": warmed,
    }


def _generate_in_process(share: Share, start_at: float) -> dict:
    return asyncio.run(_generate(share, start_at))


def run_open_loop(
    url: str, model: str, phases: list[Phase], deadline_s: float, procs: int, seed: int
) -> tuple[Records, dict]:
    """Runs the phases back to back over `procs` spawned processes; returns every request's
    record (times relative to the start of the first phase) and what the generator saw of
    itself (warm-up answers, cpu, a message of each failure code)."""
    shares = [
        Share(
            url, model, tuple((p.rate / procs, p.duration_s) for p in phases), deadline_s, seed + i
        )
        for i in range(procs)
    ]
    start_at = now() + PROCESS_START_S
    with ProcessPoolExecutor(procs, mp_context=get_context("spawn")) as pool:
        parts = list(pool.map(_generate_in_process, shares, [start_at] * procs))
    records = Records()
    details: dict[str, str] = {}
    for part in parts:
        for name in ("scheduled", "sent", "done"):
            values = array("d")
            values.frombytes(part[name])
            getattr(records, name).extend(v - start_at for v in values)
        records.codes.extend(part["codes"])
        details = {**part["details"], **details}
    generator = {
        "processes": len(parts),
        "warm_up_answers": sum(part["warmed"] for part in parts),
        # Near 1 per core: the generator itself was the bottleneck, whatever the lag says.
        "cpu_busy": [round(p["cpu_s"] / p["wall_s"], 3) if p["wall_s"] else None for p in parts],
        "failure_examples": details,
    }
    return records, generator


# ---- capacity and the server's own count ---------------------------------------------------


def measure_capacity(args: argparse.Namespace, url: str, procs: int) -> dict:
    """Closed-loop throughput at `--capacity-concurrency`, by the load generator verb."""
    command = [
        sys.executable, "-m", "benchmarks", "load", "--json",
        "--url", url,
        "--model", args.model,
        "--concurrency", str(args.capacity_concurrency),
        "--duration", str(args.capacity_seconds),
        "--warmup", str(args.capacity_warmup),
        "--procs", str(procs),
    ]  # fmt: skip
    limit = args.capacity_warmup + args.capacity_seconds + 120
    done = servers.run_pinned(command, args.client_cpus, limit)
    if done.returncode != 0:
        raise RuntimeError(f"the capacity load failed: {done.stderr.strip()[-600:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.pop("spec", None)
    if not result.get("throughput"):
        raise RuntimeError(f"no request succeeded while measuring capacity: {result['errors']}")
    return result


def rows_executed(url: str, model: str) -> int | None:
    """Batch rows the server has run for `model` (ModelStatistics inference_count)."""
    import grpc

    from tiffin.protos import method_path, protocol

    pb = protocol()
    with grpc.insecure_channel(url) as channel:
        call = channel.unary_unary(
            method_path("ModelStatistics"),
            request_serializer=pb.ModelStatisticsRequest.SerializeToString,
            response_deserializer=pb.ModelStatisticsResponse.FromString,
        )
        try:
            reply = call(pb.ModelStatisticsRequest(name=model), timeout=5)
        except grpc.RpcError:
            return None
    return sum(int(s.inference_count) for s in reply.model_stats)


def settled_rows(url: str, model: str) -> tuple[int | None, bool]:
    """The row count once it stops growing (the server may still run work it queued during
    the overload, for callers long gone); and whether it did stop within SETTLE_S."""
    deadline = now() + SETTLE_S
    last = rows_executed(url, model)
    while now() < deadline:
        time.sleep(0.5)
        current = rows_executed(url, model)
        if current is not None and current == last:
            return current, True
        last = current
    return last, False


# ---- the command -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="mlp", help="benchmark model")
    parser.add_argument("--overload", type=float, default=2.0, help="offered load x capacity")
    parser.add_argument("--duration", type=float, default=20.0, help="overload seconds")
    parser.add_argument("--deadline-ms", type=float, default=1000.0, help="per request")
    parser.add_argument(
        "--recovery-load", type=float, default=0.5, help="offered load x capacity after it"
    )
    parser.add_argument("--recovery-duration", type=float, default=10.0, help="seconds")
    parser.add_argument(
        "--capacity",
        type=float,
        default=None,
        help="capacity in req/s to use instead of measuring it",
    )
    parser.add_argument("--capacity-concurrency", type=int, default=64, help="closed-loop clients")
    parser.add_argument("--capacity-seconds", type=float, default=5.0, help="measured seconds")
    parser.add_argument("--capacity-warmup", type=float, default=2.0, help="warm-up seconds")
    parser.add_argument("--server-cpus", default="1", help="taskset list for the server")
    parser.add_argument("--client-cpus", default="0", help="taskset list for the load")
    parser.add_argument(
        "--procs", type=int, default=None, help="generator processes (default: one per client cpu)"
    )
    parser.add_argument("--seed", type=int, default=0, help="of the arrival times")
    parser.add_argument("--grpc-threads", type=int, default=None, help="serverctl --grpc-threads")
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/TIME")
    add_repository_arguments(parser)


def _check(args: argparse.Namespace) -> None:
    model_spec(args.model)
    parse_cpus(args.server_cpus)
    positive = ("overload", "duration", "deadline_ms", "capacity_seconds")
    for name in positive:
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive")
    if args.recovery_load < 0 or args.recovery_duration < 0:
        raise SystemExit("--recovery-load and --recovery-duration must not be negative")
    if args.capacity is not None and args.capacity <= 0:
        raise SystemExit("--capacity must be positive")


def main(args: argparse.Namespace) -> int:
    _check(args)
    client_cpus = parse_cpus(args.client_cpus)
    procs = args.procs or len(client_cpus)
    # Spawned generators inherit the pinning.
    os.sched_setaffinity(0, client_cpus)
    out: Path = args.out or RESULTS_DIR / datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    deadline_s = args.deadline_ms / 1000
    run: dict[str, Any] = {
        **environment.run_header(
            args.server_cpus,
            args.client_cpus,
            "taskset -c; the generator processes inherit os.sched_setaffinity",
        ),
        "settings": {
            "model": args.model,
            "overload": args.overload,
            "duration_s": args.duration,
            "deadline_ms": args.deadline_ms,
            "recovery_load": args.recovery_load,
            "recovery_duration_s": args.recovery_duration,
            "capacity_concurrency": args.capacity_concurrency,
            "capacity_seconds": args.capacity_seconds,
            "capacity_warmup_s": args.capacity_warmup,
            "generator_processes": procs,
            "generator": "grpc.aio, one pre-serialized request (lean client), unary",
            "seed": args.seed,
            "grpc_threads": args.grpc_threads,
            "instance_kind": args.instance_kind,
            "instance_count": args.instance_count,
            "max_queue_delay_us": args.max_queue_delay_us,
        },
        "notes": [],
    }
    # What the server will run: this checkout, unless PYTHONPATH puts another copy first.
    import tiffin.server

    run["environment"]["tiffin_imported_from"] = str(Path(tiffin.server.__file__).resolve().parent)
    repository = write_repository(args.model_repository, [args.model], repository_options(args))
    for sig in (signal.SIGTERM, signal.SIGHUP):
        # Stopped from outside: unwind, so that the server stops.
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    failed = False
    try:
        server = servers.start_tiffin(
            repository, args.server_cpus, out / "server.log", [args.model], args.grpc_threads
        )
        try:
            _measure(args, server.url, procs, deadline_s, run)
        finally:
            status = server.stop()
            run["server_exit_status"] = status
            if status != 0:
                run["notes"].append(f"the server exited with {status}: {server.log_tail(5)}")
    except (RuntimeError, TimeoutError) as exc:
        run["notes"].append(str(exc)[:1000])
        failed = True
    finally:
        run["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
        run["load_average"]["after"] = environment.load_average()
        paths = write_all(run, out)
    print(paths["markdown"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 1 if failed else 0


def _measure(args: argparse.Namespace, url: str, procs: int, deadline_s: float, run: dict) -> None:
    if args.capacity is None:
        print(f"measuring capacity: {args.capacity_concurrency} clients ...", file=sys.stderr)
        closed = measure_capacity(args, url, procs)
        run["capacity"] = {"req_per_s": closed["throughput"], "measured": True, "load": closed}
    else:
        run["capacity"] = {"req_per_s": args.capacity, "measured": False}
    capacity = run["capacity"]["req_per_s"]
    phases = [Phase("overload", args.overload, args.overload * capacity, 0.0, args.duration)]
    if args.recovery_duration > 0:
        phases.append(
            Phase(
                "recovery",
                args.recovery_load,
                args.recovery_load * capacity,
                args.duration,
                args.recovery_duration,
            )
        )
    print(
        f"capacity {capacity:,.0f} req/s; offering "
        + ", then ".join(f"{p.rate:,.0f}/s for {p.duration_s:g} s" for p in phases)
        + f" with {args.deadline_ms:g} ms deadlines ...",
        file=sys.stderr,
    )
    before = rows_executed(url, args.model)
    records, generator = run_open_loop(url, args.model, phases, deadline_s, procs, args.seed)
    after, settled = settled_rows(url, args.model)
    rows = None
    if before is not None and after is not None:
        rows = after - before - generator["warm_up_answers"]
    run["generator"] = generator
    run.update(summarise(records, phases, capacity, deadline_s, rows))
    if run.get("server_work"):
        run["server_work"]["settled"] = settled
    if not settled:
        run["notes"].append(
            f"the server was still running queued work {SETTLE_S:g} s after the load ended"
        )
