"""The gRPC front door: KServe v2 / Triton's GRPCInferenceService, health and reflection,
on the data plane. `GrpcFrontDoor` is all the rest of the server uses."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from tiffin.protos import MAX_MESSAGE_BYTES, SERVICE_NAME, protocol

from ..dataplane import DataPlane
from ..registry import ModelRegistry
from ..security import Security
from ..settings import ServerSettings
from .admin import admin_handler
from .health import Health
from .service import InferenceService

log = logging.getLogger(__name__)


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """inference.proto plus health and reflection, in a pool apart from protobuf's default one
    (where tritonclient may have put Triton's own inference.* messages)."""
    pool = descriptor_pool.DescriptorPool()
    for file_proto in protocol().file_descriptor_set.file:
        pool.Add(file_proto)
    for module in (health_pb2, reflection_pb2):
        pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return pool


class GrpcFrontDoor:
    """A gRPC server for the data plane, bound by `start()`, stopped by `stop()`."""

    def __init__(
        self,
        plane: DataPlane,
        registry: ModelRegistry,
        settings: ServerSettings,
        receive_limit: int,
        security: Security,
    ) -> None:
        self._plane = plane
        self._registry = registry
        self._credentials = security.grpc_credentials()
        s = settings
        options = [
            ("grpc.max_send_message_length", s.max_message_bytes or MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", receive_limit),
            ("grpc.so_reuseport", 0),  # a taken port must fail loudly, not be shared
        ]
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=s.grpc_threads, thread_name_prefix="grpc"),
            options=options,
            maximum_concurrent_rpcs=s.grpc_threads,
        )
        self._service = InferenceService(
            plane, registry, settings, receive_limit, security.grpc_mutual
        )
        self._server.add_generic_rpc_handlers(
            (self._service.generic_handler(), admin_handler(plane, security.grpc_mutual))
        )
        self._health = Health(self._server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self._server,
            pool=_reflection_pool(),
        )

    def start(self, host: str, port: int) -> int:
        """Binds and starts serving; the port bound (`port` 0 picks a free one)."""
        address = f"{host}:{port}"
        try:
            if self._credentials is None:
                bound = self._server.add_insecure_port(address)
            else:
                bound = self._server.add_secure_port(address, self._credentials)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {address}: {exc}") from None
        self._server.start()
        tls = " (TLS)" if self._credentials is not None else ""
        log.info("listening for gRPC%s on %s:%d", tls, host, bound)
        return bound

    def models_changed(self) -> None:
        """Request size limits and health statuses follow the models that serve."""
        self._service.refresh_limits()
        self._health.update_models(self._registry)
        self._health.set_ready(self._plane.is_ready())

    def begin_shutdown(self) -> None:
        """Health NOT_SERVING first (load balancers stop sending), then open streams end
        once what they already sent is answered."""
        self._health.shutdown()
        self._service.end_streams()

    def stop(self, grace: float) -> None:
        """Refuses new calls and waits up to `grace` seconds for those in flight."""
        self._server.stop(grace).wait()
