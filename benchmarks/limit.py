"""The in-process limit: the model run by Tiffin's own backend code, no server, on one core.

Pinned with os.sched_setaffinity to the server's core(s), onnxruntime with the repository's
parameters (one intra-op thread, or the server's defaults under --default-threads). For each
batch size it calls `Backend.infer` back to back and reports items/s and call latency; the
best items/s over all batch sizes is *the limit*.
Run as `python -m benchmarks limit --models mlp --cpus 1 --json` (the runner does so).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .models import DEFAULT_REPOSITORY, parse_names, spec

HELP = "Measure the in-process limit of benchmark models (items/s per batch size)."

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


def load_backend(repository: Path, name: str) -> Any:
    """Loads version 1 of a repository model with the backend the server would use."""
    from tiffin.backends import Device, get_batch_backend
    from tiffin.protos.model_config import ModelConfig

    written = yaml.safe_load((repository / name / "config.yaml").read_text())
    # Only what the backend reads: the instance kind (cpu/inline) is the server's business.
    config = ModelConfig(
        name=name,
        # A user's config may leave the backend to be told from model.onnx.
        backend=written.get("backend") or "onnxruntime",
        max_batch_size=written["max_batch_size"],
        parameters=written.get("parameters", {}),
    )
    backend_cls = get_batch_backend(config.backend)
    version_dir = repository / name / "1"
    config = backend_cls.complete_config(config, backend_cls.model_path(config, version_dir))
    backend = backend_cls()
    backend.load(config, version_dir, Device("cpu"))
    return backend


def measure_batch(backend: Any, x: np.ndarray, seconds: float, min_calls: int = 5) -> dict:
    """Calls `infer` on one batch back to back for about `seconds`; items/s and latency."""
    for _ in range(3):  # first calls allocate; not part of the figure
        backend.infer({"INPUT0": x}, ["OUTPUT0"])
    latencies = []
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        t0 = time.perf_counter()
        backend.infer({"INPUT0": x}, ["OUTPUT0"])
        t1 = time.perf_counter()
        latencies.append(t1 - t0)
        if t1 >= deadline and len(latencies) >= min_calls:
            break
    elapsed = time.perf_counter() - start
    lat = np.array(latencies) * 1e3
    return {
        "batch": int(x.shape[0]),
        "calls": len(latencies),
        "items_per_s": x.shape[0] * len(latencies) / elapsed,
        "latency_ms": {
            "p50": float(np.percentile(lat, 50)),
            "p90": float(np.percentile(lat, 90)),
            "p99": float(np.percentile(lat, 99)),
            "mean": float(lat.mean()),
        },
    }


def measure_model(
    repository: Path, name: str, seconds: float, batch_sizes: tuple[int, ...] = BATCH_SIZES
) -> dict:
    """The limit of one model: every batch size, and the best items/s among them."""
    backend = load_backend(repository, name)
    model = spec(name)
    try:
        batches = [measure_batch(backend, model.sample(b), seconds) for b in batch_sizes]
    finally:
        backend.unload()
    best = max(batches, key=lambda b: b["items_per_s"])
    return {
        "batches": batches,
        "best_items_per_s": best["items_per_s"],
        "best_batch": best["batch"],
        "batch1_p50_ms": batches[0]["latency_ms"]["p50"] if batches[0]["batch"] == 1 else None,
    }


def parse_cpus(text: str) -> list[int]:
    """'1', '0,2' or '2-3' -> cpu numbers (taskset's list syntax)."""
    cpus: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-")
            cpus.extend(range(int(lo), int(hi) + 1))
        elif part:
            cpus.append(int(part))
    if not cpus:
        raise ValueError(f"no cpus in '{text}'")
    return cpus


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated model names")
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--cpus", default=None, help="pin to these cpus (taskset list syntax)")
    parser.add_argument("--seconds", type=float, default=1.0, help="per batch size")
    parser.add_argument(
        "--batch-sizes", default=",".join(map(str, BATCH_SIZES)), help="comma-separated"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")


def main(args: argparse.Namespace) -> int:
    cpus = parse_cpus(args.cpus) if args.cpus else sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cpus)
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    results = {
        name: measure_model(args.model_repository, name, args.seconds, batch_sizes)
        for name in parse_names(args.models)
    }
    if args.json:
        json.dump({"cpus": cpus, "models": results}, sys.stdout)
        print()
        return 0
    for name, result in results.items():
        print(
            f"{name} (cpus {cpus}): limit {result['best_items_per_s']:.0f} items/s "
            f"at batch {result['best_batch']}"
        )
        for b in result["batches"]:
            print(
                f"  batch {b['batch']:3d}: {b['items_per_s']:9.0f} items/s  "
                f"p50 {b['latency_ms']['p50']:.3f} ms  p99 {b['latency_ms']['p99']:.3f} ms"
            )
    return 0
