"""The worker process: loads one backend instance and runs the batches its arena receives.

Started with `spawn` by WorkerInstance. The environment (CUDA_VISIBLE_DEVICES first)
is set before any framework is imported. Messages on the pipe are small pickled
headers; tensors stay in the shared-memory arena.

  frontend -> worker   ("infer", [TensorRef inputs], [output names], first free offset,
                        [rows of each request], traceparent of the batch's span or "")
                       ("stop",)
  worker -> frontend   ("ready", {pid, environment})  or  ("failed", message)   once
                       ("done", [TensorRef outputs], input_ns, infer_ns, output_ns,
                        {request index: (at fault, message)} for the requests the backend
                        reported failed, (start, end) of the backend's call in
                        time.monotonic_ns() for a traced batch or None); input_ns is the
                        backend's own copy onto its device (the frontend adds its copy into
                        the arena)
                       ("error", message) or ("invalid", message) when the backend raised
                       for the whole batch (InvalidInput: "invalid")
"""

from __future__ import annotations

import os
import pickle
import signal
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from tiffin.backends import BatchResult, use_compute_cpus
from tiffin.protos.errors import InvalidInput


def run_worker(
    conn: Connection,
    arena_name: str,
    config_data: dict[str, Any],
    version_dir: str,
    device: tuple[str, int],
    environment: dict[str, str],
) -> None:
    """Entry point of a worker process."""
    os.environ.update(environment)  # before anything imports a framework
    use_compute_cpus()  # started by a frontend thread: its threads take the models' cores
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the frontend's to handle

    from tiffin.backends import Device, get_batch_backend
    from tiffin.protos.model_config import ModelConfig

    from .arena import Arena
    from .tensorref import view, write

    arena = Arena.attach(arena_name)
    config = ModelConfig.model_validate(config_data)
    backend = get_batch_backend(config.backend)()
    try:
        backend.load(config, Path(version_dir), Device(device[0], device[1]))  # type: ignore[arg-type]
    except Exception as exc:
        conn.send_bytes(pickle.dumps(("failed", f"{type(exc).__name__}: {exc}")))
        return
    info = {"pid": os.getpid(), "environment": {k: os.environ.get(k) for k in environment}}
    conn.send_bytes(pickle.dumps(("ready", info)))
    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):  # the frontend is gone
            break
        if message[0] == "stop":
            break
        _, input_refs, outputs, free_offset, rows, traceparent = message
        try:
            inputs = {ref.name: view(arena, ref) for ref in input_refs}
            # A traced batch's compute span is recorded by the frontend, which exports the
            # others: this process only says when the call ran (CLOCK_MONOTONIC is the
            # machine's, the same in both processes).
            began = time.monotonic_ns() if traceparent else 0
            start = time.perf_counter_ns()
            result = backend.infer_batch(inputs, outputs, rows)
            call_ns = time.perf_counter_ns() - start
            compute = (began, time.monotonic_ns()) if traceparent else None
            del inputs
            failed = failure_messages(result, len(rows))
            input_ns, infer_ns, device_output_ns = split(result, call_ns)
            refs = []
            written = time.perf_counter_ns()
            if len(failed) < len(rows):  # no outputs are needed when every request failed
                for name in outputs:
                    if name not in result.outputs:
                        raise KeyError(f"the backend returned no output named '{name}'")
                    array = _as_array(result.outputs[name])
                    ref, free_offset = write(arena, name, array, free_offset)
                    refs.append(ref)
            # compute_output: the backend's copy off its device, then ours into the arena.
            output_ns = device_output_ns + time.perf_counter_ns() - written
            reply: tuple[Any, ...] = ("done", refs, input_ns, infer_ns, output_ns, failed, compute)
        except InvalidInput as exc:  # the request's fault, not the model's
            reply = ("invalid", exc.message)
        except Exception as exc:
            reply = ("error", str(exc) or type(exc).__name__)
        conn.send_bytes(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))
    backend.unload()


def split(result: BatchResult, call_ns: int) -> tuple[int, int, int]:
    """A backend call's nanoseconds as (input, infer, output): the copies onto and off the
    device that the backend reported, and the rest."""
    input_ns, output_ns = max(int(result.input_ns), 0), max(int(result.output_ns), 0)
    return input_ns, max(call_ns - input_ns - output_ns, 0), output_ns


def failure_messages(result: BatchResult, requests: int) -> dict[int, tuple[bool, str]]:
    """The requests of a batch of `requests` that `infer_batch` reported failed, as picklable
    messages: index -> (whether the request is at fault, message).

    Raises TypeError or ValueError, failing the whole batch, when `result` is not a
    BatchResult or names something other than a request of the batch."""
    if not isinstance(result, BatchResult):
        raise TypeError(
            f"infer_batch returned {type(result).__name__}; it must return a "
            "tiffin.backends.BatchResult"
        )
    if not result.failed:
        return {}
    messages = {}
    for index, error in result.failed.items():
        if not isinstance(index, int) or not 0 <= index < requests:
            raise ValueError(
                f"infer_batch reported a failure for request {index!r}, but the batch holds "
                f"requests 0 to {requests - 1}"
            )
        if isinstance(error, InvalidInput):
            messages[index] = (True, error.message)
        elif isinstance(error, Exception):
            messages[index] = (False, str(error) or type(error).__name__)
        else:
            raise TypeError(
                f"infer_batch reported {type(error).__name__} for request {index}; "
                "report an exception"
            )
    return messages


def _as_array(value: Any) -> Any:
    import numpy as np

    return np.ascontiguousarray(value)
