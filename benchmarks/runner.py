"""`python -m benchmarks run`: the whole benchmark, pinned, in one command.

  1. writes the model repository (config.yaml from the flags);
  2. starts `serverctl serve` pinned to the server cpus, waits on the gRPC health check, drives
     every model x mode x client x concurrency (each load warms up, then measures; the `rest`
     client on the HTTP port, unary only), runs perf_analyzer against it when available, and
     stops it with SIGTERM; target `tiffin-nohttp` does the same with REST switched off
     (--no-allow-http), to show what serving REST beside gRPC costs the gRPC path, and
     `tiffin-nometrics` with metrics off (--no-allow-metrics), to show what metrics cost;
     `tiffin-tuned` serves the hand-tuned config (kind: inline, intra_op_thread_count: 1);
  3. starts each peer (benchmarks/peers: FastAPI, MLServer, BentoML) on the same cpus, serving
     the same ONNX files, and drives it with the same closed-loop points (unary, its client);
  4. measures the in-process limit on the same cpus;
  5. starts each echo server on the same cpus and drives it with the same load;
  6. writes run.json, results.md and results.png into --out, and prints the table.

Loads run as `python -m benchmarks load` subprocesses pinned to the client cpus, so that each
starts clean and a crash costs one point, not the run.

`--side-by-side` measures Tiffin as a user first configures it (`max_batch_size: 64` and
`dynamic_batching: {}`, nothing else), Tiffin hand-tuned, the peers, the echo servers and the
limit in one run, and reports them in one table (report.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import environment, peers, perf_analyzer, report, servers
from .clients import CLIENTS, UNARY_ONLY
from .limit import parse_cpus
from .load import DEFAULT_STREAMS, MODES, format_result
from .models import (
    DEFAULT_REPOSITORY,
    TUNED_CONFIG,
    USER_CONFIG,
    RepositoryOptions,
    add_repository_arguments,
    config_yaml,
    parse_names,
    repository_options,
    write_repository,
)
from .models import spec as model_spec

HELP = "Run Tiffin, the echo ceilings and the in-process limit, pinned; write JSON, table, plot."

TARGETS = (
    "tiffin",
    "tiffin-tuned",
    "tiffin-nohttp",
    "tiffin-nometrics",
    *peers.PEERS,
    "echo-sync",
    "echo-aio",
)
DEFAULT_TARGETS = ("tiffin", "echo-sync", "echo-aio")
# Tiffin targets whose HTTP port is open, so that the `rest` client can drive them.
REST_TARGETS = ("tiffin", "tiffin-tuned")
# Clients of a peer's own protocol (FastAPI's raw body, BentoML's JSON).
PEER_ONLY_CLIENTS = tuple(c for c in peers.PEER_CLIENTS.values() if c in UNARY_ONLY)
# v2 gRPC clients, which a v2 peer (MLServer) takes as well as Tiffin.
V2_CLIENTS = ("lean", "tritonclient")
ALL_CLIENTS = (*CLIENTS, "perf_analyzer")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _choices(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    values = _list(text)
    bad = [v for v in values if v not in allowed]
    if bad:
        raise SystemExit(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated benchmark models")
    parser.add_argument("--concurrency", default="1,8,32,64", help="closed-loop client counts")
    parser.add_argument("--rates", default="", help="open-loop arrival rates per second, if any")
    parser.add_argument(
        "--modes",
        default=None,
        help="unary and/or streaming (default both; unary only with --side-by-side)",
    )
    parser.add_argument(
        "--clients", default="lean,perf_analyzer", help=f"any of {', '.join(ALL_CLIENTS)}"
    )
    parser.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help=f"servers to measure, any of {', '.join(TARGETS)} (tiffin-nohttp: REST off; "
        "tiffin-nometrics: metrics off; tiffin-tuned: kind inline and one intra-op thread; "
        f"{', '.join(peers.PEERS)}: the peers)",
    )
    parser.add_argument(
        "--side-by-side",
        action="store_true",
        help="Tiffin with the config a user writes, tiffin-tuned, the peers (--peers), the "
        "echo servers and the limit in one run, reported in one table",
    )
    parser.add_argument(
        "--peers",
        default=",".join(peers.PEERS),
        help="the peers --side-by-side runs (set them up with `python -m benchmarks peers-setup`)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every server this many times, in reverse order every other round; "
        "the side-by-side table shows each point's median (a busy machine drifts)",
    )
    parser.add_argument(
        "--user-config",
        action="store_true",
        help="target tiffin serves exactly `max_batch_size: 64` and `dynamic_batching: {}` "
        "(the default with --side-by-side), not the config.yaml flags",
    )
    parser.add_argument("--server-cpus", default="1", help="taskset list for the servers")
    parser.add_argument("--client-cpus", default="0", help="taskset list for the load")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds per point")
    parser.add_argument("--limit-seconds", type=float, default=1.0, help="per batch size")
    parser.add_argument(
        "--streams", type=int, default=DEFAULT_STREAMS, help="streams carrying streaming load"
    )
    parser.add_argument(
        "--procs", type=int, default=None, help="load processes (default: one per client cpu)"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    parser.add_argument("--grpc-threads", type=int, default=None, help="serverctl --grpc-threads")
    parser.add_argument(
        "--pa-interval-ms",
        type=int,
        default=None,
        help="perf_analyzer measurement window (default: a third of --duration, at least 1000)",
    )
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/TIME")
    add_repository_arguments(parser)


@dataclass
class Plan:
    """What one run measures, from the command line."""

    models: list[str]
    concurrency: list[int]
    rates: list[float]
    modes: list[str]
    clients: list[str]
    targets: list[str]
    server_cpus: str
    client_cpus: str
    procs: int
    args: argparse.Namespace
    user_config: bool = False  # target tiffin serves USER_CONFIG
    rounds: int = 1  # every server measured this many times
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> Plan:
        client_cpus = parse_cpus(args.client_cpus)
        parse_cpus(args.server_cpus)
        side_by_side = getattr(args, "side_by_side", False)
        if side_by_side:
            chosen = _choices(args.peers, peers.PEERS, "peers")
            targets = ["tiffin", "tiffin-tuned", *chosen, "echo-sync", "echo-aio"]
        else:
            targets = _choices(args.targets, TARGETS, "targets")
        modes = args.modes or ("unary" if side_by_side else "unary,streaming")
        return cls(
            models=parse_names(args.models),
            concurrency=[int(c) for c in _list(args.concurrency)],
            rates=[float(r) for r in _list(args.rates)],
            modes=_choices(modes, MODES, "modes"),
            clients=_choices(args.clients, ALL_CLIENTS, "clients"),
            targets=targets,
            server_cpus=args.server_cpus,
            client_cpus=args.client_cpus,
            procs=args.procs or len(client_cpus),
            args=args,
            user_config=side_by_side or getattr(args, "user_config", False),
            rounds=max(1, getattr(args, "rounds", 1)),
        )

    def repository_options(self) -> RepositoryOptions:
        """What target `tiffin` serves: the config a user writes, or the flags'."""
        return USER_CONFIG if self.user_config else repository_options(self.args)

    def python_clients(self) -> list[str]:
        return [c for c in self.clients if c in CLIENTS]

    def peer_clients(self, peer: str) -> list[str]:
        """The clients that drive a peer: its own protocol's (FastAPI's raw body), or the v2
        gRPC clients of this run (the lean one at least)."""
        own = peers.PEER_CLIENTS[peer]
        if own not in V2_CLIENTS:
            return [own]
        return [c for c in self.python_clients() if c in V2_CLIENTS] or [own]

    def loads(self, target: str) -> Iterator[dict]:
        """Every load point for one server: closed loop, then open loop (Tiffin only).
        Peers get the closed-loop points, unary (the side-by-side table's mode)."""
        if target in peers.PEERS:
            for model in self.models:
                for client in self.peer_clients(target):
                    for c in self.concurrency:
                        yield {"model": model, "mode": "unary", "client": client, "concurrency": c}
            return
        for model in self.models:
            for mode in self.modes:
                for client in self.python_clients():
                    if client in PEER_ONLY_CLIENTS:
                        continue  # a peer's own protocol; Tiffin does not speak it
                    if client in UNARY_ONLY and (mode != "unary" or target not in REST_TARGETS):
                        continue  # REST: unary, and only where the HTTP port is open
                    for c in self.concurrency:
                        yield {"model": model, "mode": mode, "client": client, "concurrency": c}
                    if target == "tiffin":
                        for rate in self.rates:
                            yield {"model": model, "mode": mode, "client": client, "rate": rate}

    def pa_points(self, target: str) -> Iterator[dict]:
        if target in peers.PEERS:
            return  # perf_analyzer asks for Triton's ModelConfig, which the peers lack
        modes = [m for m in perf_analyzer.PA_MODES if m != "streaming" or "streaming" in self.modes]
        modes = [m for m in modes if m == "streaming" or "unary" in self.modes]
        for model in self.models:
            for mode in modes:
                for c in self.concurrency:
                    yield {
                        "model": model,
                        "mode": mode,
                        "client": "perf_analyzer",
                        "concurrency": c,
                    }


class Display:
    """A rich progress bar on a terminal, plain lines otherwise (CI logs, pipes)."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        self._progress: Any = None
        if sys.stderr.isatty():
            try:
                from rich.console import Console
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                )
            except ImportError:
                return
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self._task = self._progress.add_task("starting", total=total)

    def __enter__(self) -> Display:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def start(self, what: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=what)

    def finish(self, line: str) -> None:
        self.done += 1
        text = f"[{self.done}/{self.total}] {line}"
        if self._progress is not None:
            self._progress.update(self._task, advance=1)
            self._progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def note(self, line: str) -> None:
        if self._progress is not None:
            self._progress.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=sys.stderr, flush=True)


def _label(target: str, point: dict) -> str:
    where = f"c={point['concurrency']}" if "concurrency" in point else f"rate={point['rate']:g}/s"
    return f"{target} {point['model']} {point['mode']} {point['client']} {where}"


def _run_load(plan: Plan, server: servers.ServerProcess, point: dict) -> dict:
    args = plan.args
    command = [
        sys.executable,
        "-m",
        "benchmarks",
        "load",
        "--json",
        "--url",
        server.http_url if point["client"] in UNARY_ONLY else server.url,
        "--model",
        point["model"],
        "--mode",
        point["mode"],
        "--client",
        point["client"],
        "--duration",
        str(args.duration),
        "--warmup",
        str(args.warmup),
        "--streams",
        str(args.streams),
        "--timeout",
        str(args.timeout),
        "--procs",
        str(plan.procs),
    ]
    if "concurrency" in point:
        command += ["--concurrency", str(point["concurrency"])]
    else:
        command += ["--rate", str(point["rate"])]
    limit = args.warmup + args.duration + 2 * args.timeout + 60
    try:
        done = servers.run_pinned(command, plan.client_cpus, limit)
    except subprocess.TimeoutExpired:
        return {"error": f"the load generator ran past {limit:.0f} s"}
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        return {"error": f"load generator exit {done.returncode}: {tail[:400]}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.pop("spec", None)
    return result


class Journal:
    """The results so far; each is stamped with the 1-minute load average and saved at once
    (run.partial.json), so an interrupted run keeps what it measured."""

    def __init__(self, run: dict, out: Path) -> None:
        self.run = run
        self.results: list[dict] = []
        self.path = out / "run.partial.json"

    def add(self, result: dict) -> None:
        result["load_1min"] = environment.load_average()[0]
        self.results.append(result)
        partial = {**self.run, "results": self.results}
        self.path.write_text(json.dumps(partial, indent=1, default=str) + "\n")

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


# perf_analyzer keeps every response's outputs until it exits: against an echo server with
# cnn's 48 KiB answers it grew by ~200 MB/s (14 GB after 40 s) on this machine.
PA_ECHO_MAX_BYTES = 16 * 1024


def _pa_skip(target: str, point: dict) -> str | None:
    """Why perf_analyzer must not run this point against this server, if it must not."""
    if not target.startswith("echo-"):
        return None
    if model_spec(point["model"]).input_bytes > PA_ECHO_MAX_BYTES:
        return (
            "skipped: perf_analyzer keeps every response in memory, and the echo answers "
            f"{point['model']} with {model_spec(point['model']).input_bytes // 1024} KiB "
            "(~200 MB/s of growth); the lean client's echo figure stands in"
        )
    if target == "echo-sync" and point["mode"] == "streaming" and point["concurrency"] > 4:
        return (
            "skipped: perf_analyzer opens one stream per concurrency slot and the sync "
            "echo server's 4 threads serve 4 streams at a time"
        )
    return None


def _measure_server(
    plan: Plan,
    target: str,
    server: servers.ServerProcess,
    pa: perf_analyzer.PerfAnalyzer | None,
    display: Display,
    journal: Journal,
    tag: dict | None = None,
) -> None:
    """Drives every point of `plan` against one server; each result carries `tag` (its
    round, when there are several)."""
    url = server.url
    tag = tag or {}
    for point in plan.loads(target):
        display.start(_label(target, point))
        result = {"target": target, **point, **tag, **_run_load(plan, server, point)}
        journal.add(result)
        shown = result["error"] if "error" in result else format_result(result)
        display.finish(f"{_label(target, point)}: {shown}")
    if pa is None:
        return
    args = plan.args
    interval = args.pa_interval_ms or max(1000, int(args.duration * 1000 / 3))
    for point in plan.pa_points(target):
        label = _label(target, point) + f" ({point['mode']})"
        note = _pa_skip(target, point)
        if note:
            journal.add({"target": target, **point, **tag, "skipped": note})
            display.finish(f"{label}: {note}")
            continue
        display.start(label)
        figures = perf_analyzer.run(
            pa,
            url,
            point["model"],
            point["mode"],
            point["concurrency"],
            interval,
            timeout=interval / 1000 * perf_analyzer.MAX_TRIALS + 45,
            cpus=plan.client_cpus,
        )
        result = {"target": target, **point, **tag, **figures}
        journal.add(result)
        if "throughput" in result:
            lat = result.get("latency_ms") or {}
            shown = (
                f"{result['throughput']:8.0f} infer/s  p50 {lat.get('p50', math.nan):.3f}  "
                f"p99 {lat.get('p99', math.nan):.3f} ms"
            )
        else:
            shown = ""
        if "error" in result:
            shown += f"  ({result['error']})"
        display.finish(f"{label}: {shown}")


@contextmanager
def _serving(
    start: Callable[[], servers.ServerProcess], name: str, notes: list[str], stops: dict
) -> Iterator[servers.ServerProcess | None]:
    """Starts a server; yields None (and notes why) if it does not start; stops it after."""
    try:
        server = start()
    except peers.PeerUnavailable as exc:
        notes.append(str(exc))
        yield None
        return
    except (RuntimeError, TimeoutError) as exc:
        notes.append(f"{name} did not start: {str(exc)[:600]}")
        yield None
        return
    try:
        yield server
    finally:
        stops[name] = server.stop()
        if stops[name] != 0:
            notes.append(
                f"{name} exited with status {stops[name]} at SIGTERM: {server.log_tail(5)}"
            )


def _measure_limit(plan: Plan, repository: Path) -> dict:
    command = [
        sys.executable,
        "-m",
        "benchmarks",
        "limit",
        "--json",
        "--models",
        ",".join(plan.models),
        "--model-repository",
        str(repository),
        "--cpus",
        plan.server_cpus,
        "--seconds",
        str(plan.args.limit_seconds),
    ]
    done = servers.run_pinned(command, plan.server_cpus, 600)
    if done.returncode != 0:
        plan.notes.append(f"the limit measurement failed: {done.stderr.strip()[-600:]}")
        return {}
    return dict(json.loads(done.stdout.strip().splitlines()[-1])["models"])


def _steps(plan: Plan, pa: bool) -> int:
    count = 0
    for target in plan.targets:
        count += sum(1 for _ in plan.loads(target))
        if pa:
            count += sum(1 for _ in plan.pa_points(target))
    return count * plan.rounds + 1  # the limit


def main(args: argparse.Namespace) -> int:
    plan = Plan.from_arguments(args)
    os.sched_setaffinity(0, parse_cpus(plan.client_cpus))
    out: Path = args.out or RESULTS_DIR / datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    run: dict[str, Any] = {
        **environment.run_header(
            plan.server_cpus, plan.client_cpus, "taskset -c; the limit also os.sched_setaffinity"
        ),
        "settings": {
            "models": plan.models,
            "concurrency": plan.concurrency,
            "rates": plan.rates,
            "modes": plan.modes,
            "clients": plan.clients,
            "targets": plan.targets,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "limit_seconds_per_batch": args.limit_seconds,
            "streams": args.streams,
            "load_processes": plan.procs,
            "request_timeout_s": args.timeout,
            "grpc_threads": args.grpc_threads,
            "instance_kind": args.instance_kind,
            "instance_count": args.instance_count,
            "max_queue_delay_us": args.max_queue_delay_us,
            "default_threads": args.default_threads,
            "rounds": plan.rounds,
        },
    }
    pa = None
    if "perf_analyzer" in plan.clients:
        pa, why = perf_analyzer.find()
        if pa is None:
            plan.notes.append(f"perf_analyzer skipped: {why}")
        else:
            run["environment"]["perf_analyzer"] = pa.version
            if any(t in peers.PEERS for t in plan.targets):
                plan.notes.append(
                    "perf_analyzer not run against the peers: it asks for Triton's "
                    "ModelConfig, which they do not serve"
                )
    repository = write_repository(args.model_repository, plan.models, plan.repository_options())
    repositories = {t: repository for t in plan.targets if t.startswith("tiffin")}
    # The limit runs the model as the hand-tuned config does (one intra-op thread); a user's
    # config names no threads, so under --user-config it comes from the tuned repository.
    limit_repository = repository
    if "tiffin-tuned" in plan.targets or plan.user_config:
        tuned = write_repository(Path(f"{args.model_repository}-tuned"), plan.models, TUNED_CONFIG)
        repositories["tiffin-tuned"] = tuned
        if plan.user_config:
            limit_repository = tuned
    for target in [t for t in plan.targets if t in peers.PEERS]:
        try:
            peers.peer_python(target)
        except peers.PeerUnavailable as exc:  # noted, and the run goes on without it
            plan.notes.append(str(exc))
            plan.targets.remove(target)
    run["environment"]["peers"] = peers.describe([t for t in plan.targets if t in peers.PEERS])
    run["settings"]["side_by_side"] = bool(getattr(args, "side_by_side", False))
    run["settings"]["tiffin_config"] = "user" if plan.user_config else "flags"
    run["settings"]["config_yaml"] = {
        t: config_yaml(TUNED_CONFIG if t == "tiffin-tuned" else plan.repository_options())
        for t in repositories
    }
    run["settings"]["peers"] = {
        t: peers.PEER_DESCRIPTIONS[t] for t in plan.targets if t in peers.PEERS
    }
    journal = Journal(run, out)
    limits: dict = {}
    stops: dict[str, int] = {}
    served: dict[str, dict] = run.setdefault("served_choices", {})
    display = Display(_steps(plan, pa is not None))
    for sig in (signal.SIGTERM, signal.SIGHUP):
        # Stopped from outside: unwind, so that servers stop and what was measured is written.
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))

    def measure(target: str, round_index: int) -> None:
        """Starts one server, drives every point against it, and stops it."""
        base = "server" if target == "tiffin" else target
        log = out / (f"{base}.log" if round_index == 0 else f"{base}.round{round_index}.log")
        if target.startswith("tiffin"):
            start = functools.partial(
                servers.start_tiffin,
                repositories[target],
                plan.server_cpus,
                log,
                plan.models,
                args.grpc_threads,
                http=target != "tiffin-nohttp",
                metrics=target != "tiffin-nometrics",
            )
        elif target in peers.PEERS:
            start = functools.partial(
                peers.start_peer, target, repository, plan.models, plan.server_cpus, log
            )
        else:
            start = functools.partial(
                servers.start_echo, target.removeprefix("echo-"), plan.server_cpus, log
            )
        display.start(f"starting {target}")
        tag = {"round": round_index} if plan.rounds > 1 else {}
        with _serving(start, target, plan.notes, stops) as server:
            if server is None:
                return
            if target.startswith("tiffin") and round_index == 0:
                # What the server chose where the config left it open, and why.
                served[target] = servers.served_choices(server.url, plan.models)
            _measure_server(plan, target, server, pa, display, journal, tag)

    try:
        with display:
            for note in plan.notes:  # what will not be measured, before the points
                display.note(note)
            ordered = [t for t in plan.targets if t.startswith("tiffin")]
            ordered += [t for t in plan.targets if t in peers.PEERS]
            echoes = [t for t in plan.targets if t.startswith("echo-")]
            for target in ordered:
                measure(target, 0)
            display.start("in-process limit")
            limits = run["limit"] = _measure_limit(plan, limit_repository)
            display.finish(
                "limit: "
                + ", ".join(
                    f"{m} {v['best_items_per_s']:.0f} items/s (batch {v['best_batch']})"
                    for m, v in limits.items()
                )
            )
            for target in echoes:
                measure(target, 0)
            # Later rounds measure every server again, in reverse order every other round,
            # so that a machine getting busier or quieter does not favour one server.
            for round_index in range(1, plan.rounds):
                sequence = ordered + echoes
                for target in reversed(sequence) if round_index % 2 else sequence:
                    measure(target, round_index)
    finally:
        run["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
        run["load_average"]["after"] = environment.load_average()
        run["server_exit_status"] = stops
        run["limit"] = limits
        run["results"] = journal.results
        run["derived"] = report.derive(limits, journal.results)
        run["side_by_side"] = report.side_by_side(run)
        run["notes"] = plan.notes
        paths = report.write_all(run, out)
        journal.close()
        print(paths["markdown"].read_text())
        print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0
