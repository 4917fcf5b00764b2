"""Python clients for any KServe v2 / Triton gRPC server: numpy in, numpy out.

Built on Tiffin's own protocol code (a private descriptor pool), so they work in
the same process as tritonclient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np

from tiffin.protos import MESSAGE_SIZE_OPTIONS, method_path, protocol

from .codec import build_request, read_response

_UNARY = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelConfig",
    "ModelInfer",
    "ModelStatistics",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
)


class InferenceServerError(Exception):
    """An RPC failed: `code` is the grpc.StatusCode, `message` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"[{code.name}] {message}")
        self.code = code
        self.message = message


def _methods(channel: Any) -> dict[str, Any]:
    pb = protocol()
    methods = {}
    for method in pb.service.methods:
        if method.name not in _UNARY:
            continue
        methods[method.name] = channel.unary_unary(
            method_path(method.name),
            request_serializer=getattr(pb, method.input_type.name).SerializeToString,
            response_deserializer=getattr(pb, method.output_type.name).FromString,
        )
    return methods


class InferenceClient:
    """A blocking client. `timeout` (seconds) is the default deadline of every call;
    `credentials` make the channel TLS (`grpc.ssl_channel_credentials(...)`), and `token`
    is sent as `authorization: Bearer <token>` with every call."""

    def __init__(
        self,
        url: str,
        timeout: float | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: str = "",
    ) -> None:
        self._pb = protocol()
        self._channel = (
            grpc.secure_channel(url, credentials, options=MESSAGE_SIZE_OPTIONS)
            if credentials is not None
            else grpc.insecure_channel(url, options=MESSAGE_SIZE_OPTIONS)
        )
        self._call = _methods(self._channel)
        self._timeout = timeout
        self._metadata = [("authorization", f"Bearer {token}")] if token else None

    def _rpc(self, name: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return self._call[name](
                request, timeout=timeout or self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise InferenceServerError(exc.code(), exc.details() or "") from None

    def is_server_live(self) -> bool:
        return bool(self._rpc("ServerLive", self._pb.ServerLiveRequest()).live)

    def is_server_ready(self) -> bool:
        return bool(self._rpc("ServerReady", self._pb.ServerReadyRequest()).ready)

    def is_model_ready(self, model: str, version: str = "") -> bool:
        reply = self._rpc("ModelReady", self._pb.ModelReadyRequest(name=model, version=version))
        return bool(reply.ready)

    def server_metadata(self) -> Any:
        return self._rpc("ServerMetadata", self._pb.ServerMetadataRequest())

    def model_metadata(self, model: str, version: str = "") -> Any:
        return self._rpc(
            "ModelMetadata", self._pb.ModelMetadataRequest(name=model, version=version)
        )

    def model_config(self, model: str, version: str = "") -> Any:
        request = self._pb.ModelConfigRequest(name=model, version=version)
        return self._rpc("ModelConfig", request).config

    def statistics(self, model: str = "", version: str = "") -> Any:
        request = self._pb.ModelStatisticsRequest(name=model, version=version)
        return self._rpc("ModelStatistics", request)

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        version: str = "",
        request_id: str = "",
        parameters: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Runs one request; returns output name -> array."""
        request = build_request(model, inputs, outputs, version, request_id, parameters)
        return read_response(self._rpc("ModelInfer", request, timeout))

    def repository_index(self) -> Any:
        """The repository's models and versions, each with its state and reason."""
        return self._rpc("RepositoryIndex", self._pb.RepositoryIndexRequest()).models

    def load_model(self, model: str, parameters: Mapping[str, str] | None = None) -> None:
        """(Re)loads a model; `parameters` are string parameters of the call (Tiffin takes
        `traffic`, new weights such as "1=90,2=10")."""
        request = self._pb.RepositoryModelLoadRequest(model_name=model)
        for key, value in (parameters or {}).items():
            request.parameters[key].string_param = value
        self._rpc("RepositoryModelLoad", request)

    def unload_model(self, model: str) -> None:
        self._rpc("RepositoryModelUnload", self._pb.RepositoryModelUnloadRequest(model_name=model))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncInferenceClient:
    """The asyncio twin of InferenceClient (grpc.aio)."""

    def __init__(self, url: str, timeout: float | None = None) -> None:
        self._pb = protocol()
        self._channel = grpc.aio.insecure_channel(url, options=MESSAGE_SIZE_OPTIONS)
        self._call = _methods(self._channel)
        self._timeout = timeout

    async def _rpc(self, name: str, request: Any, timeout: float | None = None) -> Any:
        try:
            return await self._call[name](request, timeout=timeout or self._timeout)
        except grpc.RpcError as exc:
            raise InferenceServerError(exc.code(), exc.details() or "") from None

    async def is_server_ready(self) -> bool:
        return bool((await self._rpc("ServerReady", self._pb.ServerReadyRequest())).ready)

    async def is_model_ready(self, model: str, version: str = "") -> bool:
        request = self._pb.ModelReadyRequest(name=model, version=version)
        return bool((await self._rpc("ModelReady", request)).ready)

    async def model_metadata(self, model: str, version: str = "") -> Any:
        request = self._pb.ModelMetadataRequest(name=model, version=version)
        return await self._rpc("ModelMetadata", request)

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        version: str = "",
        request_id: str = "",
        parameters: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        request = build_request(model, inputs, outputs, version, request_id, parameters)
        return read_response(await self._rpc("ModelInfer", request, timeout))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncInferenceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
