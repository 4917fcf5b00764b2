"""Model instances: one loaded backend each, running one batch at a time.

`InlineInstance` runs the backend inside the frontend process on a thread of its own
(for tiny models, where crossing processes costs more than the compute).
`WorkerInstance` runs it in a worker process fed through a shared-memory arena, and
restarts that process if it dies; `restart_failure` says why while it cannot.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import pickle
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tiffin.backends import Backend, Device, get_batch_backend, use_compute_cpus
from tiffin.protos.errors import BackendError, InvalidInput, ModelNotReady, TiffinError
from tiffin.protos.model_config import ModelConfig

from .arena import Arena
from .request import InferenceRequest
from .tensorref import view, write_inputs
from .worker import failure_messages, run_worker, split

log = logging.getLogger(__name__)

RESTART_BACKOFF_SECONDS = (0.2, 1.0, 2.0, 5.0, 10.0)


@dataclass
class Execution:
    """The outputs of one batch, whole (all rows), how long its stages took, and the
    requests that the backend reported failed (index in the batch -> error).

    `input_ns` is gathering the inputs (into the arena, for a worker) and the backend's
    copy onto its device, `infer_ns` the rest of the backend's call, `output_ns` the
    backend's copy off its device and a worker's copy of the outputs into the arena (see
    BatchResult)."""

    outputs: dict[str, np.ndarray]  # empty when every request failed
    borrowed: bool  # the arrays view an arena that the instance's next batch reuses
    input_ns: int
    infer_ns: int
    output_ns: int = 0
    failed: dict[int, TiffinError] = field(default_factory=dict)
    # When the backend's call began and ended (time.monotonic_ns()), for a traced batch.
    compute: tuple[int, int] | None = None


class InstanceDied(ModelNotReady):
    """The worker process running the batch exited."""


class Instance(Protocol):
    name: str
    device: Device
    restart_failure: str | None  # why its worker could not start again, while it cannot
    restarts: int  # attempts to start its worker process again after it exited

    @property
    def alive(self) -> bool: ...

    @property
    def pid(self) -> int:
        """Its worker process's id; 0 when it runs in the server process or none runs."""
        ...

    async def load(self) -> None: ...

    async def wait_alive(self) -> None: ...

    async def execute(
        self, requests: list[InferenceRequest], outputs: list[str], traceparent: str = ""
    ) -> Execution:
        """Runs one batch; `traceparent` (the batch's span, "" when untraced) asks for the
        times of the backend's call in `Execution.compute`."""
        ...

    async def unload(self) -> None: ...


def gather_inputs(requests: list[InferenceRequest]) -> dict[str, list[np.ndarray]]:
    """Input name -> the arrays of every request, in request order."""
    return {name: [r.inputs[name] for r in requests] for name in requests[0].inputs}


def failure_errors(messages: dict[int, tuple[bool, str]]) -> dict[int, TiffinError]:
    """The errors of the requests that a backend reported failed (see `failure_messages`):
    InvalidInput for those at fault, BackendError for the others."""
    return {
        index: InvalidInput(message) if at_fault else BackendError(message)
        for index, (at_fault, message) in messages.items()
    }


# Inline instances load and unload one at a time: loading is not thread-safe in every
# framework (torch.export.load keeps a global deserializer; the python backend edits
# sys.modules), and in a worker process it never runs beside another load anyway.
_INLINE_LOADING = threading.Lock()


class InlineInstance:
    """Runs the backend inside the frontend process, on a thread of its own.

    No process hand-off and no shared-memory copy, which is what makes it worth having for
    tiny models. It loads on a thread of its own and runs batches on its executor's
    serving thread (`run`), never on the event loop: a model that loads or runs slowly
    never stalls the loop, and with it every other model.
    """

    def __init__(self, name: str, config: ModelConfig, version_dir: Path, device: Device) -> None:
        self.name = name
        self.device = device
        self._config = config
        self._version_dir = version_dir
        self._backend: Backend | None = None
        # It loads the backend, whose framework threads inherit its cores: the models'.
        self._thread = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"inline-{name}", initializer=use_compute_cpus
        )
        self.restart_failure: str | None = None  # never restarts: it runs in this process
        self.restarts = 0

    @property
    def alive(self) -> bool:
        return self._backend is not None

    @property
    def pid(self) -> int:
        return 0

    async def load(self) -> None:
        loop = asyncio.get_running_loop()
        self._backend = await loop.run_in_executor(self._thread, self._load)

    def _load(self) -> Backend:
        with _INLINE_LOADING:
            backend = get_batch_backend(self._config.backend)()
            try:
                backend.load(self._config, self._version_dir, self.device)
            except Exception as exc:  # worded as a worker's load failure is (see worker.py)
                raise RuntimeError(f"{type(exc).__name__}: {exc}") from exc
            return backend

    def _unload(self, backend: Backend) -> None:
        with _INLINE_LOADING:
            backend.unload()

    async def wait_alive(self) -> None:
        return None

    async def execute(
        self, requests: list[InferenceRequest], outputs: list[str], traceparent: str = ""
    ) -> Execution:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._thread, self.run, requests, outputs, bool(traceparent)
        )

    def run(
        self, requests: list[InferenceRequest], outputs: list[str], traced: bool = False
    ) -> Execution:
        """Runs one batch on the calling thread (the executor's serving thread for this
        instance: never two at once); `traced` asks for the times of the backend's call."""
        assert self._backend is not None, "run() before load()"
        start = time.perf_counter_ns()
        inputs = {
            name: arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
            for name, arrays in gather_inputs(requests).items()
        }
        rows = [r.batch_size for r in requests]
        began = time.monotonic_ns() if traced else 0
        begin = time.perf_counter_ns()
        try:
            result = self._backend.infer_batch(inputs, outputs, rows)
            call_ns = time.perf_counter_ns() - begin
            compute = (began, time.monotonic_ns()) if traced else None
            failed = failure_messages(result, len(rows))
        except InvalidInput:  # the request's fault, not the model's
            raise
        except Exception as exc:
            raise BackendError(str(exc) or type(exc).__name__) from exc
        device_input_ns, infer_ns, output_ns = split(result, call_ns)
        input_ns = begin - start + device_input_ns
        if len(failed) == len(rows):  # no outputs are needed when every request failed
            return Execution(
                {}, False, input_ns, infer_ns, output_ns, failure_errors(failed), compute
            )
        results = result.outputs
        missing = [n for n in outputs if n not in results]
        if missing:
            raise BackendError(f"the backend returned no output named {', '.join(missing)}")
        return Execution(
            {n: np.asarray(results[n]) for n in outputs},
            False,
            input_ns,
            infer_ns,
            output_ns,
            failure_errors(failed) if failed else {},
            compute,
        )

    async def unload(self) -> None:
        backend, self._backend = self._backend, None
        if backend is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._unload, backend)
        self._thread.shutdown(wait=False)


def worker_environment(device: Device) -> tuple[dict[str, str], Device]:
    """CUDA_VISIBLE_DEVICES for a worker, and the device as the worker will see it."""
    if device.kind == "cpu":
        return {"CUDA_VISIBLE_DEVICES": ""}, device  # CPU instances never touch a GPU
    parent_visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if parent_visible:  # our GPU ids index the parent's own visible list
        physical = [v.strip() for v in parent_visible.split(",") if v.strip()][device.id]
    else:
        physical = str(device.id)
    return {"CUDA_VISIBLE_DEVICES": physical}, Device("gpu", 0)


class WorkerInstance:
    """Runs the backend in a worker process started with `spawn`, fed through an arena.

    If the process dies, the batch it was running fails with UNAVAILABLE naming the
    instance, and a new process is started (with backoff) while the model stays loaded.
    While an attempt to start it has failed, `restart_failure` says why.
    """

    def __init__(
        self,
        name: str,
        config: ModelConfig,
        version_dir: Path,
        device: Device,
        arena_bytes: int,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.name = name
        self.device = device
        self._config = config
        self._version_dir = version_dir
        self._arena_bytes = arena_bytes
        self._on_change = on_change
        self._arena: Arena | None = None
        self._process: Any = None
        self._conn: Any = None
        self._pending: asyncio.Future[Any] | None = None
        self._alive = asyncio.Event()
        self._stopping = False
        self._restarting: asyncio.Task[None] | None = None
        self.restart_failure: str | None = None
        self.restarts = 0
        self.worker_info: dict[str, Any] = {}  # what the worker reported: pid, environment

    @property
    def alive(self) -> bool:
        return self._alive.is_set()

    @property
    def pid(self) -> int:
        process = self._process
        return int(process.pid) if process is not None and process.pid else 0

    async def load(self) -> None:
        self._arena = Arena.create(self.name, self._arena_bytes)
        try:
            await self._start_process()
        except BaseException:
            self._arena.close()
            self._arena = None
            raise

    async def _start_process(self) -> None:
        assert self._arena is not None
        loop = asyncio.get_running_loop()
        context = multiprocessing.get_context("spawn")
        parent_end, child_end = context.Pipe()
        environment, worker_device = worker_environment(self.device)
        process = context.Process(
            target=run_worker,
            name=f"tiffin-{self.name}",
            daemon=True,
            args=(
                child_end,
                self._arena.name,
                self._config.model_dump(),
                str(self._version_dir),
                (worker_device.kind, worker_device.id),
                environment,
            ),
        )
        await loop.run_in_executor(None, process.start)
        child_end.close()
        self._process, self._conn = process, parent_end
        self._pending = loop.create_future()
        loop.add_reader(parent_end.fileno(), self._on_message, process)
        loop.add_reader(process.sentinel, self._on_exit, process)
        message = await self._pending
        if message[0] == "failed":
            await self._reap()
            raise RuntimeError(message[1])
        self.worker_info = message[1]
        self.restart_failure = None
        self._alive.set()
        self._on_change()
        log.info("instance %s: worker pid %d ready on %s", self.name, process.pid, self.device)

    def _on_message(self, process: Any) -> None:
        try:
            message = pickle.loads(self._conn.recv_bytes())
        except (EOFError, OSError):
            self._on_exit(process)
            return
        future, self._pending = self._pending, None
        if future is not None and not future.done():
            future.set_result(message)

    def _on_exit(self, process: Any) -> None:
        if process is not self._process or self._process is None:
            return  # this process was already handled
        loop = asyncio.get_running_loop()
        loop.remove_reader(process.sentinel)
        loop.remove_reader(self._conn.fileno())
        process.join(timeout=1)
        code = process.exitcode
        self._conn.close()
        self._process = None
        self._alive.clear()
        self._on_change()
        error = InstanceDied(
            f"instance {self.name} of model '{self._config.name}' (worker pid {process.pid}) "
            f"exited with code {code} while running this request"
        )
        future, self._pending = self._pending, None
        if future is not None and not future.done():
            future.set_exception(error)
        if self._stopping or not self.worker_info:
            return  # unloading, or its first load failed (load() raises that)
        if self._restarting is not None and not self._restarting.done():
            return  # it died while restarting: the restart loop tries again
        log.error("%s; restarting it", error.message.replace(" while running this request", ""))
        self._restarting = loop.create_task(self._restart())

    async def _restart(self) -> None:
        for attempt in range(10**9):
            delay = RESTART_BACKOFF_SECONDS[min(attempt, len(RESTART_BACKOFF_SECONDS) - 1)]
            await asyncio.sleep(delay)
            if self._stopping:
                return
            self.restarts += 1
            try:
                await self._start_process()
                return
            except Exception as exc:
                log.error(
                    "instance %s could not restart (attempt %d): %s", self.name, attempt + 1, exc
                )
                # Told to the executor, so that requests waiting for this worker fail now
                # rather than wait for a retry that may never succeed.
                self.restart_failure = (
                    f"instance {self.name} exited and could not restart ({exc}); "
                    "the server keeps retrying"
                )
                self._on_change()

    async def wait_alive(self) -> None:
        await self._alive.wait()

    async def execute(
        self, requests: list[InferenceRequest], outputs: list[str], traceparent: str = ""
    ) -> Execution:
        if not self.alive or self._arena is None:
            raise InstanceDied(f"instance {self.name} of model '{self._config.name}' is restarting")
        start = time.perf_counter_ns()
        refs, free_offset = write_inputs(self._arena, gather_inputs(requests))
        input_ns = time.perf_counter_ns() - start
        future = asyncio.get_running_loop().create_future()
        self._pending = future
        try:
            self._conn.send_bytes(
                pickle.dumps(
                    (
                        "infer",
                        refs,
                        outputs,
                        free_offset,
                        [r.batch_size for r in requests],
                        traceparent,
                    ),
                    protocol=pickle.HIGHEST_PROTOCOL,
                )
            )
        except OSError as exc:  # it died a moment ago; _on_exit has yet to hear of it
            self._pending = None
            raise InstanceDied(
                f"instance {self.name} of model '{self._config.name}' exited before it could "
                "run this request"
            ) from exc
        message = await future
        if message[0] == "error":
            raise BackendError(message[1])
        if message[0] == "invalid":
            raise InvalidInput(message[1])
        _, output_refs, device_input_ns, infer_ns, output_ns, failed, compute = message
        return Execution(
            {ref.name: view(self._arena, ref) for ref in output_refs},
            True,
            input_ns + device_input_ns,
            infer_ns,
            output_ns,
            failure_errors(failed) if failed else {},
            compute,
        )

    async def _reap(self) -> None:
        """Stops the current worker process, politely first."""
        process, conn = self._process, self._conn
        if process is None:
            return
        self._process = None
        loop = asyncio.get_running_loop()
        loop.remove_reader(process.sentinel)
        loop.remove_reader(conn.fileno())
        try:
            conn.send_bytes(pickle.dumps(("stop",)))
        except OSError:
            pass
        await loop.run_in_executor(None, process.join, 10)
        if process.is_alive():
            process.kill()
            await loop.run_in_executor(None, process.join, 5)
        conn.close()

    async def unload(self) -> None:
        self._stopping = True
        if self._restarting is not None:
            self._restarting.cancel()
        self._alive.clear()
        await self._reap()
        if self._arena is not None:
            self._arena.close()
            self._arena = None
