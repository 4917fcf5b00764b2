"""`python -m benchmarks swap`: latency while a model is swapped under load.

A closed loop of clients calls one model; meanwhile the model is reloaded (`load_model`,
the registry's atomic swap: new executors built and warmed beside the old, then traffic
moves) every `--every` seconds. Each request's send time and latency are kept, and the
report compares the p99 of the second after each reload began with the steady p99 of the
seconds before the first: the issue's bar is a swap second no worse than 2x steady.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from . import environment, servers
from .limit import parse_cpus
from .models import (
    DEFAULT_REPOSITORY,
    add_repository_arguments,
    repository_options,
    write_repository,
)
from .models import (
    INPUT as INPUT_NAME,
)
from .models import spec as model_spec

HELP = "Latency while a model is swapped (reloaded) under closed-loop load."
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="mlp", help="benchmark model")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop clients")
    parser.add_argument("--steady", type=float, default=8.0, help="seconds before the first swap")
    parser.add_argument("--swaps", type=int, default=3, help="reloads")
    parser.add_argument("--every", type=float, default=4.0, help="seconds between reloads")
    parser.add_argument("--server-cpus", default="1", help="taskset list for the server")
    parser.add_argument("--client-cpus", default="0", help="taskset list for the load")
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/TIME")
    add_repository_arguments(parser)


def _p99(latencies: list[float]) -> float:
    return float(np.percentile(latencies, 99)) if latencies else float("nan")


def main(args: argparse.Namespace) -> int:
    import tritonclient.grpc as grpcclient

    spec = model_spec(args.model)
    os.sched_setaffinity(0, parse_cpus(args.client_cpus))
    out: Path = args.out or RESULTS_DIR / datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    repository = write_repository(args.model_repository, [spec.name], repository_options(args))
    server = servers.start_tiffin(
        repository,
        args.server_cpus,
        out / "server.log",
        [spec.name],
        extra=("--model-control-mode", "explicit", "--load-model", spec.name),
    )
    records: list[tuple[float, float, bool]] = []  # (sent, latency, failed)
    lock = threading.Lock()
    stop = threading.Event()
    began = time.monotonic()

    def client() -> None:
        caller = grpcclient.InferenceServerClient(server.url)
        sample = spec.sample()
        tensor = grpcclient.InferInput(INPUT_NAME, list(sample.shape), "FP32")
        tensor.set_data_from_numpy(sample)
        inputs = [tensor]
        mine = []
        while not stop.is_set():
            sent = time.monotonic()
            failed = False
            try:
                caller.infer(spec.name, inputs)
            except Exception:  # noqa: BLE001 - a failure is a result here
                failed = True
            mine.append((sent - began, time.monotonic() - sent, failed))
        with lock:
            records.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
    swaps: list[tuple[float, float]] = []
    try:
        for thread in threads:
            thread.start()
        admin = grpcclient.InferenceServerClient(server.url)
        time.sleep(args.steady)
        for _ in range(args.swaps):
            start = time.monotonic() - began
            admin.load_model(spec.name)
            swaps.append((start, time.monotonic() - began))
            time.sleep(args.every)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
        server.stop()
    ok = [(t, latency) for t, latency, failed in records if not failed]
    steady = [latency for t, latency in ok if 1.0 <= t < args.steady]
    rows = []
    for start, end in swaps:
        second = [latency for t, latency in ok if start <= t < start + 1.0]
        during = [latency for t, latency in ok if start <= t < end + 1.0]
        rows.append(
            {
                "swap_began_s": round(start, 3),
                "load_call_s": round(end - start, 3),
                "swap_second_p99_ms": round(_p99(second) * 1000, 3),
                "until_a_second_after_p99_ms": round(_p99(during) * 1000, 3),
                "requests_in_swap_second": len(second),
            }
        )
    steady_p99 = _p99(steady) * 1000
    report = {
        **environment.run_header(args.server_cpus, args.client_cpus, "taskset -c"),
        "model": spec.name,
        "concurrency": args.concurrency,
        "requests": len(records),
        "failed": sum(1 for _, _, failed in records if failed),
        "steady_p99_ms": round(steady_p99, 3),
        "swaps": rows,
        "worst_ratio": round(max(r["swap_second_p99_ms"] for r in rows) / steady_p99, 2),
    }
    (out / "swap.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k not in ("environment",)}, indent=2))
    return 0
