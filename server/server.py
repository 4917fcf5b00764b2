"""The Tiffin server: gRPC frontend, model manager and scheduler, wired together."""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent import futures
from importlib import metadata

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from tiffin.backends import parse_allowed_backends
from tiffin.protos import MAX_MESSAGE_BYTES, SERVICE_NAME, protocol
from tiffin.scheduler import Scheduler
from tiffin.scheduler.arena import remove_stale_arenas

from .health import Health
from .manager import ModelManager
from .service import InferenceService, ServerState
from .settings import ServerSettings
from .wire import message_limit

log = logging.getLogger(__name__)


def _version() -> str:
    try:
        return metadata.version("tiffin")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """inference.proto plus health and reflection, in a pool apart from protobuf's default one
    (where tritonclient may have put Triton's own inference.* messages)."""
    pool = descriptor_pool.DescriptorPool()
    for file_proto in protocol().file_descriptor_set.file:
        pool.Add(file_proto)
    for module in (health_pb2, reflection_pb2):
        pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return pool


class Server:
    """Serves a model repository over gRPC.

    `start()` returns once the port is bound and the repository's models have been
    loaded (or failed to); `stop()` stops taking new calls, lets in-flight ones finish
    within the grace period, then unloads every model.
    """

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.port = 0
        self._state = ServerState()
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(
            target=self._loop.run_forever, name="scheduler-loop", daemon=True
        )
        self._scheduler = Scheduler()
        self._manager = ModelManager(
            settings.model_repository,
            self._scheduler,
            allowed_backends=parse_allowed_backends(settings.allowed_backends),
        )
        self._stopped = threading.Event()
        self._grpc: grpc.Server | None = None
        self._health: Health | None = None

    @property
    def manager(self) -> ModelManager:
        return self._manager

    def start(self) -> None:
        s = self.settings
        if not s.model_repository.is_dir():
            raise FileNotFoundError(f"model repository {s.model_repository} is not a folder")
        remove_stale_arenas()
        self._loop_thread.start()
        specs = self._manager.read_all()
        # gRPC refuses a larger message from its length prefix, before receiving it: a
        # repository of fixed-size models is not made to buffer a 2 GiB body.
        receive_limit = s.max_message_bytes or message_limit(
            v.config for spec in specs for v in spec.versions if v.config is not None
        )
        log.info("request messages may be up to %d bytes", receive_limit)
        options = [
            ("grpc.max_send_message_length", s.max_message_bytes or MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", receive_limit),
            ("grpc.so_reuseport", 0),  # a taken port must fail loudly, not be shared
        ]
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=s.grpc_threads, thread_name_prefix="grpc"),
            options=options,
            maximum_concurrent_rpcs=s.grpc_threads,
        )
        service = InferenceService(
            self._manager,
            self._scheduler,
            self._loop,
            self._state,
            _version(),
            s,
            receive_limit,
            self._models_changed,
        )
        self._service = service
        self._grpc.add_generic_rpc_handlers((service.generic_handler(),))
        self._health = Health(self._grpc)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self._grpc,
            pool=_reflection_pool(),
        )
        address = f"{s.host}:{s.grpc_port}"
        try:
            self.port = self._grpc.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {address}: {exc}") from None
        self._grpc.start()
        log.info("listening for gRPC on %s:%d", s.host, self.port)
        asyncio.run_coroutine_threadsafe(self._manager.load_all(specs), self._loop).result()
        self._state.loaded = True
        self._models_changed()
        ready = sum(1 for m in self._manager.models() if m.ready_versions())
        log.info(
            "serving %d of %d model(s) from %s",
            ready,
            len(self._manager.models()),
            s.model_repository,
        )

    def _models_changed(self) -> None:
        self._service.refresh_limits()
        if self._health is not None:
            self._health.update_models(self._manager)
            self._health.set_ready(self._service.is_ready())

    def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown; safe to call more than once."""
        if self._stopped.is_set() or self._grpc is None:
            return
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        log.info("shutting down: finishing in-flight requests (up to %.0f s)", grace)
        self._state.stopping = True
        if self._health is not None:
            self._health.shutdown()  # first, so that load balancers stop sending work
        self._service.end_streams()
        self._grpc.stop(grace).wait()
        asyncio.run_coroutine_threadsafe(self._manager.unload_all(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(timeout=5)
        self._stopped.set()
        log.info("stopped")

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until stop() has finished; True if it has."""
        return self._stopped.wait(timeout)
