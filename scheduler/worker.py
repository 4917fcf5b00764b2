"""The worker process: loads one backend instance and runs the batches its arena receives.

Started with `spawn` by WorkerInstance. The environment (CUDA_VISIBLE_DEVICES first)
is set before any framework is imported. Messages on the pipe are small pickled
headers; tensors stay in the shared-memory arena.

  frontend -> worker   ("infer", [TensorRef inputs], [output names], first free offset)
                       ("stop",)
  worker -> frontend   ("ready", {pid, environment})  or  ("failed", message)   once
                       ("done", [TensorRef outputs], infer_ns), ("error", message)
                       or ("invalid", message) when the backend raised InvalidInput
"""

from __future__ import annotations

import os
import pickle
import signal
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any


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
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the frontend's to handle

    from tiffin.backends import Device, get_batch_backend
    from tiffin.protos.errors import InvalidInput
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
        _, input_refs, outputs, free_offset = message
        try:
            inputs = {ref.name: view(arena, ref) for ref in input_refs}
            start = time.perf_counter_ns()
            results = backend.infer(inputs, outputs)
            infer_ns = time.perf_counter_ns() - start
            del inputs
            refs = []
            for name in outputs:
                if name not in results:
                    raise KeyError(f"the backend returned no output named '{name}'")
                ref, free_offset = write(arena, name, _as_array(results[name]), free_offset)
                refs.append(ref)
            reply: tuple[Any, ...] = ("done", refs, infer_ns)
        except InvalidInput as exc:  # the request's fault, not the model's
            reply = ("invalid", exc.message)
        except Exception as exc:
            reply = ("error", str(exc) or type(exc).__name__)
        conn.send_bytes(pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL))
    backend.unload()


def _as_array(value: Any) -> Any:
    import numpy as np

    return np.ascontiguousarray(value)
