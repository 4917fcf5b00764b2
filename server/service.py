"""GRPCInferenceService: protobuf in, one call into the model manager or scheduler, protobuf out.

Handlers run on the synchronous gRPC server's threads and hand inference to the
scheduler's event loop. Errors from the core are TiffinErrors and become a gRPC
status here, at the edge, and nowhere else.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from tiffin.protos import MAX_MESSAGE_BYTES, SERVICE_NAME, model_config, protocol
from tiffin.protos.errors import (
    DeadlineExceeded,
    InvalidInput,
    ServerNotReady,
    TiffinError,
    Unsupported,
)
from tiffin.protos.names import parse_version, shown
from tiffin.scheduler import ModelKey, Scheduler
from tiffin.scheduler.statistics import DURATIONS

from .bridge import LoopBridge, Pending
from .capacity import StreamGate
from .config_message import config_message
from .inference import decode_request, encode_response
from .manager import LOADING, READY, ModelManager
from .settings import ServerSettings
from .streams import SHUTDOWN, Failure, StreamItem, StreamSession
from .wire import RequestDecoder, Undecodable, max_request_bytes, plain_decoder

log = logging.getLogger(__name__)

SERVER_NAME = "tiffin"
# RPCs whose requests carry tensors: their size is bounded by the model they name.
_TENSOR_RPCS = ("ModelInfer", "ModelStreamInfer")
# Only what really works is advertised: perf_analyzer acts on this list.
EXTENSIONS = ["model_configuration", "statistics", "model_repository"]


def _rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """Maps TiffinErrors to their status; anything else is a bug, reported as INTERNAL."""

    @functools.wraps(method)
    def handler(self: InferenceService, request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        try:
            return method(self, request, context)
        except TiffinError as exc:
            context.abort(exc.code, exc.message)
        except Exception as exc:
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, shown(f"{method.__name__} failed: {exc}", 1000))

    return handler


def _version_or_none(text: str) -> int | None:
    """A version string's number, or None when it is not one (resolve then says why)."""
    try:
        return parse_version(text)
    except ValueError:
        return None


class ServerState:
    """Whether the server is ready, shared between the Server and its handlers."""

    def __init__(self) -> None:
        self.loaded = False  # the repository's first load has finished
        self.stopping = False

    def check_accepting(self) -> None:
        if self.stopping:
            raise ServerNotReady(
                "the server is shutting down and has stopped accepting new requests"
            )


class InferenceService:
    """One method per RPC of inference.GRPCInferenceService that Tiffin offers."""

    def __init__(
        self,
        manager: ModelManager,
        scheduler: Scheduler,
        loop: asyncio.AbstractEventLoop,
        state: ServerState,
        version: str,
        settings: ServerSettings,
        receive_limit: int,
        on_models_changed: Callable[[], None],
    ) -> None:
        self._pb = protocol()
        self._manager = manager
        self._scheduler = scheduler
        self._bridge = LoopBridge(loop, scheduler)
        self._state = state
        self._version = version
        self._strict = settings.strict_readiness
        self._on_models_changed = on_models_changed
        self._infer_decoder = RequestDecoder(self._pb.ModelInferRequest)
        self._receive_limit = receive_limit
        self._warned: set[str] = set()  # models told to need more than receive_limit
        self._streams = StreamGate(settings.stream_limit, settings.max_streams_per_connection)
        self._stream_window = settings.max_stream_inflight
        self._stream_idle = settings.stream_idle_timeout_seconds or None

    def refresh_limits(self) -> None:
        """Bounds each model's requests by what its ready versions can accept."""
        limits: dict[str, int | None] = {}
        for model in self._manager.models():
            configs = [model.versions[v].spec.config for v in model.ready_versions()]
            sizes = [max_request_bytes(c) for c in configs if c is not None]
            if sizes:
                fixed = [size for size in sizes if size is not None]
                limits[model.name] = max(fixed) if len(fixed) == len(sizes) else None
        self._infer_decoder.limits = limits
        for name, limit in limits.items():
            needs_more = limit is None or limit > self._receive_limit
            if needs_more and name not in self._warned and self._receive_limit < MAX_MESSAGE_BYTES:
                self._warned.add(name)
                log.warning(
                    "model '%s' accepts requests larger than this server's message limit "
                    "(%d bytes, set when it started from the repository's models); restart "
                    "the server, or set --max-message-bytes, to let them through",
                    name,
                    self._receive_limit,
                )

    def generic_handler(self) -> grpc.GenericRpcHandler:
        """Handlers for every RPC in inference.proto; those not offered answer UNIMPLEMENTED."""
        handlers = {}
        for method in self._pb.service.methods:
            request_cls = getattr(self._pb, method.input_type.name)
            response_cls = getattr(self._pb, method.output_type.name)
            behaviour = getattr(self, method.name, None) or self._unimplemented(method.name)
            make = (
                grpc.stream_stream_rpc_method_handler
                if method.client_streaming
                else grpc.unary_unary_rpc_method_handler
            )
            decoder = (
                self._infer_decoder if method.name in _TENSOR_RPCS else plain_decoder(request_cls)
            )
            handlers[method.name] = make(
                behaviour,
                request_deserializer=decoder,
                response_serializer=response_cls.SerializeToString,
            )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)

    @staticmethod
    def _unimplemented(name: str) -> Callable[[Any, grpc.ServicerContext], Any]:
        def handler(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(
                grpc.StatusCode.UNIMPLEMENTED, f"{name} is not offered by this server (Tiffin)"
            )

        return handler

    def is_ready(self) -> bool:
        if not self._state.loaded or self._state.stopping:
            return False
        return self._manager.all_ready() if self._strict else True

    # ---- health and metadata ------------------------------------------------------------

    @_rpc
    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._pb.ServerLiveResponse(live=not self._state.stopping)

    @_rpc
    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._pb.ServerReadyResponse(ready=self.is_ready())

    @_rpc
    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        state = self._manager.state(request.name)
        loading = [v for v, s in state.versions.items() if s.state == LOADING]
        if request.version == "" and loading and not state.ready_versions():
            return self._pb.ModelReadyResponse(ready=False)
        if request.version and _version_or_none(request.version) in loading:
            return self._pb.ModelReadyResponse(ready=False)
        self._manager.resolve(request.name, request.version)
        return self._pb.ModelReadyResponse(ready=not self._state.stopping)

    @_rpc
    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._pb.ServerMetadataResponse(
            name=SERVER_NAME, version=self._version, extensions=EXTENSIONS
        )

    @_rpc
    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        spec = self._manager.resolve(request.name, request.version)
        config = spec.config
        assert config is not None
        versions = (
            [request.version]
            if request.version
            else [str(v) for v in self._manager.state(request.name).ready_versions()]
        )
        batch = [-1] if config.batching else []
        response = self._pb.ModelMetadataResponse(
            name=config.name, versions=versions, platform=config.platform or config.backend
        )
        for tensor in config.inputs:
            response.inputs.add(
                name=tensor.name, datatype=tensor.datatype, shape=batch + list(tensor.dims)
            )
        for tensor in config.outputs:
            response.outputs.add(
                name=tensor.name, datatype=tensor.datatype, shape=batch + list(tensor.dims)
            )
        return response

    @_rpc
    def ModelConfig(self, request: Any, context: grpc.ServicerContext) -> Any:
        spec = self._manager.resolve(request.name, request.version)
        assert spec.config is not None
        return self._pb.ModelConfigResponse(config=config_message(spec.config))

    @_rpc
    def ModelStatistics(self, request: Any, context: grpc.ServicerContext) -> Any:
        if request.name:
            if request.version:
                keys = [
                    ModelKey(
                        request.name, self._manager.resolve(request.name, request.version).version
                    )
                ]
            else:
                state = self._manager.state(request.name)
                keys = [ModelKey(request.name, v) for v in state.ready_versions()]
        else:
            keys = [ModelKey(s.name, v) for s in self._manager.models() for v in s.ready_versions()]
        response = self._pb.ModelStatisticsResponse()
        for key in keys:
            self._fill_statistics(response.model_stats.add(), key)
        return response

    def _fill_statistics(self, target: Any, key: ModelKey) -> None:
        stats = self._scheduler.statistics(key)
        target.name = key.name
        target.version = str(key.version)
        target.last_inference = stats.last_inference_ms
        target.inference_count = stats.inference_count
        target.execution_count = stats.execution_count
        infer = target.inference_stats
        for name in (*DURATIONS, "cache_hit", "cache_miss"):
            field = getattr(infer, name)
            field.SetInParent()  # Triton fills every sub-message, zeros included (no cache here)
            if name in DURATIONS:
                duration = getattr(stats, name)
                field.count, field.ns = duration.count, duration.ns
        for size in sorted(stats.batches):
            batch = stats.batches[size]
            entry = target.batch_stats.add(batch_size=size)
            for name in ("compute_input", "compute_infer", "compute_output"):
                duration = getattr(batch, name)
                getattr(entry, name).count = duration.count
                getattr(entry, name).ns = duration.ns

    # ---- repository ----------------------------------------------------------------------

    @_rpc
    def RepositoryIndex(self, request: Any, context: grpc.ServicerContext) -> Any:
        if request.repository_name:
            self._check_repository(request.repository_name)
        response = self._pb.RepositoryIndexResponse()
        for model in self._manager.models():
            if not model.versions:
                if not request.ready:
                    response.models.add(name=model.name, state="UNAVAILABLE", reason=model.error)
                continue
            for number, version in sorted(model.versions.items()):
                if request.ready and version.state != READY:
                    continue
                response.models.add(
                    name=model.name, version=str(number), state=version.state, reason=version.reason
                )
        return response

    @_rpc
    def RepositoryModelLoad(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._state.check_accepting()
        if request.repository_name:
            self._check_repository(request.repository_name)
        if len(request.parameters):
            raise Unsupported(
                "loading with a config or files override is not supported; edit the model "
                "folder in the repository and load it again"
            )
        try:
            self._bridge.call(self._manager.load(request.model_name))
        finally:
            self._on_models_changed()
        return self._pb.RepositoryModelLoadResponse()

    @_rpc
    def RepositoryModelUnload(self, request: Any, context: grpc.ServicerContext) -> Any:
        if request.repository_name:
            self._check_repository(request.repository_name)
        try:
            self._bridge.call(self._manager.unload(request.model_name))
        finally:
            self._on_models_changed()
        return self._pb.RepositoryModelUnloadResponse()

    def _check_repository(self, name: str) -> None:
        if name != self._manager.repository.name:
            raise InvalidInput(
                f"unknown repository '{shown(name)}'; this server serves "
                f"'{self._manager.repository.name}'"
            )

    # ---- inference -----------------------------------------------------------------------

    def _start_infer(
        self, msg: Any, deadline: float | None
    ) -> tuple[Pending, model_config.ModelConfig]:
        """Validates and queues a request: its Pending, and the config it was checked against
        (which encodes the response)."""
        self._state.check_accepting()
        spec = self._manager.resolve(msg.model_name, msg.model_version)
        assert spec.config is not None
        request = decode_request(msg, ModelKey(msg.model_name, spec.version), spec.config, deadline)
        return self._bridge.submit(request), spec.config

    @_rpc
    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        remaining = context.time_remaining()
        deadline = None
        if remaining is not None:
            if remaining <= 0:  # it waited for a handler thread past its deadline
                raise DeadlineExceeded("the client's deadline passed before the request started")
            deadline = time.monotonic() + remaining
        pending, config = self._start_infer(request, deadline)
        context.add_callback(pending.cancel)  # the client went away: drop the request
        return encode_response(pending.wait(), config)

    def ModelStreamInfer(
        self, request_iterator: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        """Answers each request in request order, while its requests run concurrently (a
        StreamSession reads them on a thread of its own). Errors are in-band unless the
        client asked otherwise (`triton_grpc_error: true`)."""
        abort_on_error = any(
            k == "triton_grpc_error" and v == "true" for k, v in context.invocation_metadata()
        )
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None

        def start(msg: Any) -> tuple[Pending, model_config.ModelConfig]:
            return self._start_infer(msg, deadline)  # the stream's deadline bounds each request

        session = StreamSession(request_iterator, start, self._stream_window)
        try:
            self._streams.enter(context.peer(), session)
        except TiffinError as exc:
            context.abort(exc.code, exc.message)
        context.add_callback(session.close)  # the client went away: drop what waits
        if self._state.stopping:  # shutdown began while this stream was being set up
            session.shut_down()
        try:
            session.start()
            while True:
                try:
                    item = session.next_item(self._stream_idle)
                except queue.Empty:
                    context.abort(
                        grpc.StatusCode.UNAVAILABLE,
                        f"the stream was closed after {self._stream_idle:g} s without a "
                        "request (--stream-idle-timeout-seconds); open a new stream to go on",
                    )
                if item is None:
                    return
                if item is SHUTDOWN:
                    context.abort(
                        grpc.StatusCode.UNAVAILABLE,
                        "the server is shutting down; send further requests to another "
                        "instance or retry once it is back",
                    )
                response = self._stream_response(item, session)
                if isinstance(response, Failure):
                    if abort_on_error:
                        context.abort(response.code, response.message)
                    response = self._stream_error(item, response.message)
                yield response
                session.answered()
        finally:
            session.close()
            self._streams.leave(session)

    def end_streams(self) -> None:
        """Shutdown: open streams end once what they already sent is answered."""
        self._streams.shut_down()

    def _stream_response(self, item: StreamItem, session: StreamSession) -> Any:
        """The response to one stream request, or the Failure to answer it with."""
        if isinstance(item.outcome, Failure):
            return item.outcome
        assert item.config is not None
        try:
            return self._pb.ModelStreamInferResponse(
                infer_response=encode_response(item.outcome.wait(), item.config, final=True)
            )
        except TiffinError as exc:
            return Failure(exc.code, exc.message)
        except Exception as exc:  # a bug: the request still gets its answer
            log.exception("a stream request failed")
            return Failure(grpc.StatusCode.INTERNAL, f"internal error: {exc}")
        finally:
            session.settled(item.outcome)

    def _stream_error(self, item: StreamItem, message: str) -> Any:
        response = self._pb.ModelStreamInferResponse(error_message=message)
        response.infer_response.id = item.id
        response.infer_response.model_name = item.model_name
        response.infer_response.model_version = item.model_version
        response.infer_response.parameters["triton_final_response"].bool_param = True
        return response
