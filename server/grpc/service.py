"""GRPCInferenceService: protobuf in, one call into the data plane, protobuf out.

Handlers run on the synchronous gRPC server's threads. The data plane runs every
operation through the interceptor chain, so what reaches a handler is a result or a
TiffinError, mapped to its gRPC status here (`_rpc`) and for streamed requests in-band.
"""

from __future__ import annotations

import functools
import logging
import queue
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from tiffin.protos import MAX_MESSAGE_BYTES, SERVICE_NAME, model_config, protocol
from tiffin.protos.errors import DeadlineExceeded, TiffinError
from tiffin.protos.names import shown
from tiffin.scheduler import Pending
from tiffin.scheduler.context import RequestContext
from tiffin.scheduler.statistics import DURATIONS, ModelStatistics

from ..dataplane import DataPlane
from ..limits import request_limits
from ..registry import ModelRegistry
from ..security import subject_of_pem
from ..settings import ServerSettings
from .capacity import StreamGate
from .codec import encode_response, parameters, wire_request
from .config_message import config_message
from .decoder import RequestDecoder, Undecodable, plain_decoder
from .streams import SHUTDOWN, Failure, StreamItem, StreamSession

log = logging.getLogger(__name__)

# RPCs whose requests carry tensors: their size is bounded by the model they name.
_TENSOR_RPCS = ("ModelInfer", "ModelStreamInfer")
# The data plane operation each RPC is, as interceptors and the request context name it.
OPERATIONS = {
    "ServerLive": "live",
    "ServerReady": "ready",
    "ModelReady": "model_ready",
    "ServerMetadata": "server_metadata",
    "ModelMetadata": "model_metadata",
    "ModelConfig": "model_config",
    "ModelStatistics": "statistics",
    "RepositoryIndex": "repository_index",
    "RepositoryModelLoad": "load",
    "RepositoryModelUnload": "unload",
    "ModelInfer": "infer",
    "ModelStreamInfer": "stream_infer",
}


# gRPC reports a call without a deadline as one centuries away; beyond this, a deadline is
# none at all (no timer is set for it, and nothing is admitted against it).
_NO_DEADLINE_SECONDS = 10 * 365 * 24 * 3600.0


def _call_context(context: grpc.ServicerContext, operation: str, mutual: bool) -> RequestContext:
    remaining = context.time_remaining()
    if remaining is not None and remaining > _NO_DEADLINE_SECONDS:
        remaining = None
    deadline = time.monotonic() + remaining if remaining is not None else None
    call = RequestContext("grpc", operation, dict(context.invocation_metadata()), deadline)
    call.peer = context.peer().removeprefix("ipv4:").removeprefix("ipv6:")  # host:port
    if mutual:
        call.client_certificate = client_certificate(context)
    return call


def client_certificate(context: grpc.ServicerContext) -> str:
    """The subject of the client's verified certificate ("" without one)."""
    pem = context.auth_context().get("x509_pem_cert")
    return subject_of_pem(pem[0]) if pem else ""


def _rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """Gives the handler its RequestContext and maps TiffinErrors to their status; an
    error of the handler's own (a bug in encoding) is logged and answered INTERNAL."""
    rpc = method.__name__

    @functools.wraps(method)
    def handler(self: InferenceService, request: Any, context: grpc.ServicerContext) -> Any:
        call = _call_context(context, OPERATIONS[rpc], self._mutual)
        if isinstance(request, Undecodable):
            call.finish(grpc.StatusCode.INVALID_ARGUMENT.name)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        try:
            response = method(self, request, context, call)
        except TiffinError as exc:
            call.finish(exc.code.name)
            context.abort(exc.code, exc.message)
        except Exception as exc:
            log.exception("%s failed", rpc)
            call.finish(grpc.StatusCode.INTERNAL.name)
            context.abort(grpc.StatusCode.INTERNAL, shown(f"{rpc} failed: {exc}", 1000))
        call.finish("OK")
        return response

    return handler


class InferenceService:
    """One method per RPC of inference.GRPCInferenceService that Tiffin offers."""

    def __init__(
        self,
        plane: DataPlane,
        registry: ModelRegistry,
        settings: ServerSettings,
        receive_limit: int,
        mutual: bool = False,
    ) -> None:
        self._pb = protocol()
        self._mutual = mutual  # clients present certificates: read their subjects
        self._plane = plane
        self._registry = registry
        self._infer_decoder = RequestDecoder(self._pb.ModelInferRequest)
        self._receive_limit = receive_limit
        self._warned: set[str] = set()  # models told to need more than receive_limit
        self._streams = StreamGate(settings.stream_limit, settings.max_streams_per_connection)
        self._stream_window = settings.max_stream_inflight
        self._stream_idle = settings.stream_idle_timeout_seconds or None

    def refresh_limits(self) -> None:
        """Bounds each model's requests by what its ready versions can accept."""
        limits = request_limits(self._registry.models())
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

    # ---- health and metadata ------------------------------------------------------------

    @_rpc
    def ServerLive(self, request: Any, context: grpc.ServicerContext, call: RequestContext) -> Any:
        return self._pb.ServerLiveResponse(live=self._plane.live(call))

    @_rpc
    def ServerReady(self, request: Any, context: grpc.ServicerContext, call: RequestContext) -> Any:
        return self._pb.ServerReadyResponse(ready=self._plane.ready(call))

    @_rpc
    def ModelReady(self, request: Any, context: grpc.ServicerContext, call: RequestContext) -> Any:
        ready = self._plane.model_ready(call, request.name, request.version)
        return self._pb.ModelReadyResponse(ready=ready)

    @_rpc
    def ServerMetadata(
        self, request: Any, context: grpc.ServicerContext, call: RequestContext
    ) -> Any:
        metadata = self._plane.server_metadata(call)
        return self._pb.ServerMetadataResponse(
            name=metadata.name, version=metadata.version, extensions=metadata.extensions
        )

    @_rpc
    def ModelMetadata(
        self, request: Any, context: grpc.ServicerContext, call: RequestContext
    ) -> Any:
        metadata = self._plane.model_metadata(call, request.name, request.version)
        response = self._pb.ModelMetadataResponse(
            name=metadata.name, versions=metadata.versions, platform=metadata.platform
        )
        for tensor in metadata.inputs:
            response.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        for tensor in metadata.outputs:
            response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        return response

    @_rpc
    def ModelConfig(self, request: Any, context: grpc.ServicerContext, call: RequestContext) -> Any:
        config = self._plane.model_config(call, request.name, request.version)
        return self._pb.ModelConfigResponse(config=config_message(config))

    @_rpc
    def ModelStatistics(
        self, request: Any, context: grpc.ServicerContext, call: RequestContext
    ) -> Any:
        response = self._pb.ModelStatisticsResponse()
        for key, stats in self._plane.statistics(call, request.name, request.version):
            target = response.model_stats.add(name=key.name, version=str(key.version))
            _fill_statistics(target, stats)
        return response

    # ---- repository ----------------------------------------------------------------------

    @_rpc
    def RepositoryIndex(
        self, request: Any, context: grpc.ServicerContext, call: RequestContext
    ) -> Any:
        response = self._pb.RepositoryIndexResponse()
        for entry in self._plane.repository_index(call, request.repository_name, request.ready):
            response.models.add(
                name=entry.name, version=entry.version, state=entry.state, reason=entry.reason
            )
        return response

    @_rpc
    def RepositoryModelLoad(
        self, request: Any, context: grpc.ServicerContext, call: RequestContext
    ) -> Any:
        self._plane.load(
            call, request.repository_name, request.model_name, parameters(request.parameters)
        )
        return self._pb.RepositoryModelLoadResponse()

    @_rpc
    def RepositoryModelUnload(
        self, request: Any, context: grpc.ServicerContext, call: RequestContext
    ) -> Any:
        self._plane.unload(call, request.repository_name, request.model_name)
        return self._pb.RepositoryModelUnloadResponse()

    # ---- inference -----------------------------------------------------------------------

    @_rpc
    def ModelInfer(self, request: Any, context: grpc.ServicerContext, call: RequestContext) -> Any:
        if call.deadline is not None and call.deadline <= time.monotonic():
            # it waited for a handler thread past its deadline
            raise DeadlineExceeded("the client's deadline passed before the request started")
        started = self._plane.infer(call, wire_request(request))
        # The client went away: drop the request (add_callback is False when the call has
        # already ended, cancelled before the callback could be added).
        if not context.add_callback(started.pending.cancel):
            started.pending.cancel()
        response = started.pending.wait()
        trace = call.timeline.trace
        if trace is None:
            return encode_response(response, started.config)
        began = time.monotonic_ns()
        encoded = encode_response(response, started.config)
        trace.record("encode", began, time.monotonic_ns())
        return encoded

    def ModelStreamInfer(
        self, request_iterator: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        """Answers each request in request order, while its requests run concurrently (a
        StreamSession reads them on a thread of its own). Errors are in-band unless the
        client asked otherwise (`triton_grpc_error: true`)."""
        stream = _call_context(context, "stream_infer", self._mutual)
        abort_on_error = stream.metadata.get("triton_grpc_error") == "true"

        def start(msg: Any) -> tuple[Pending, model_config.ModelConfig, RequestContext]:
            # Each request has a context of its own; the stream's deadline bounds each one.
            call = RequestContext("grpc", "stream_infer", stream.metadata, stream.deadline)
            call.peer, call.client_certificate = stream.peer, stream.client_certificate
            started = self._plane.infer(call, wire_request(msg))
            return started.pending, started.config, call

        session = StreamSession(request_iterator, start, self._stream_window)
        try:
            self._streams.enter(context.peer(), session)
        except TiffinError as exc:
            context.abort(exc.code, exc.message)
        if not context.add_callback(session.close):  # the client went away: drop what waits
            session.close()
        if not self._plane.accepting():  # shutdown began while this stream was being set up
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
        assert item.config is not None and item.context is not None
        status = grpc.StatusCode.OK
        try:
            response = item.outcome.wait()
            trace = item.context.timeline.trace
            began = time.monotonic_ns() if trace is not None else 0
            encoded = self._pb.ModelStreamInferResponse(
                infer_response=encode_response(response, item.config, final=True)
            )
            if trace is not None:
                trace.record("encode", began, time.monotonic_ns())
            return encoded
        except TiffinError as exc:
            status = exc.code
            return Failure(exc.code, exc.message)
        except Exception as exc:  # a bug: the request still gets its answer
            log.exception("a stream request failed")
            status = grpc.StatusCode.INTERNAL
            return Failure(status, f"internal error: {exc}")
        finally:
            item.context.finish(status.name)
            session.settled(item.outcome)

    def _stream_error(self, item: StreamItem, message: str) -> Any:
        response = self._pb.ModelStreamInferResponse(error_message=message)
        response.infer_response.id = item.id
        response.infer_response.model_name = item.model_name
        response.infer_response.model_version = item.model_version
        response.infer_response.parameters["triton_final_response"].bool_param = True
        return response


def _fill_statistics(target: Any, stats: ModelStatistics) -> None:
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
