"""The standard grpc.health.v1 service: the server as a whole, and one service name per model."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tiffin.protos import SERVICE_NAME

from ..registry import ModelRegistry

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    """Health statuses: "" and the inference service follow readiness; each model name is
    SERVING while it has a ready version."""

    def __init__(self, server: grpc.Server) -> None:
        self._servicer = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)
        self._models: set[str] = set()
        self.set_ready(False)

    def set_ready(self, ready: bool) -> None:
        status = SERVING if ready else NOT_SERVING
        self._servicer.set("", status)
        self._servicer.set(SERVICE_NAME, status)

    def update_models(self, registry: ModelRegistry) -> None:
        for model in registry.models():
            self._models.add(model.name)
            self._servicer.set(model.name, SERVING if model.ready_versions() else NOT_SERVING)

    def shutdown(self) -> None:
        """Everything NOT_SERVING, so that load balancers stop sending work."""
        self._servicer.enter_graceful_shutdown()
