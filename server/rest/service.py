"""The REST handlers: a path and a body in, one call into the data plane, JSON out.

Every request is routed (routes.py), bounded (the body is never read past what the
operation, or the model it names, can accept), decoded (codec.py) and handed to the
data plane with a `RequestContext("rest", ...)`. Inference waits for the scheduler
without blocking the event loop: the data plane's `on_done` (called on the scheduler's
thread) resolves an asyncio future through `call_soon_threadsafe`. Loading and
unloading, which wait for the registry, run on a worker thread.

TiffinError codes map to HTTP statuses as Triton's http_server.cc maps its errors
(`HttpCodeFromError`), plus the codes Triton has no counterpart for:

| gRPC code (TiffinError)   | HTTP | why                                                  |
|---------------------------|------|------------------------------------------------------|
| OK                        | 200  |                                                      |
| INVALID_ARGUMENT          | 400  | Triton; unknown model names too, as Triton           |
| UNKNOWN, ALREADY_EXISTS,  | 400  | Triton ("cases that have no direct matching code")   |
| CANCELLED, OUT_OF_RANGE,  |      |                                                      |
| FAILED_PRECONDITION       |      |                                                      |
| NOT_FOUND                 | 404  | Triton: unknown version, no available version        |
| UNAVAILABLE               | 503  | Triton: not ready, shutting down, queue timeout      |
| UNIMPLEMENTED             | 501  | Triton: features not offered                         |
| INTERNAL, DATA_LOSS       | 500  | Triton                                               |
| RESOURCE_EXHAUSTED        | 429  | Tiffin: queue full, overloaded: clients back off     |
| DEADLINE_EXCEEDED         | 504  | Tiffin: a proxied (triton backend) model timed out   |
| UNAUTHENTICATED           | 401  | for the authentication slot                          |
| PERMISSION_DENIED         | 403  | for the authorization slot                           |
| ABORTED                   | 409  |                                                      |

Paths that name nothing answer 404, a wrong method 405 (Triton's "Not Found" and "Method
Not Allowed"), Triton features not offered (shared memory, trace, logging) 501.
Errors are `{"error": "<message>"}`, as tritonclient.http reads them. Health answers 200
or 400 with an empty body (Triton), model readiness 400 "Model version not ready".
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import grpc
from aiohttp import hdrs, web

from tiffin.protos.errors import InvalidInput, Overloaded, ServerNotReady, TiffinError, Unsupported
from tiffin.protos.names import shown
from tiffin.scheduler import Pending
from tiffin.scheduler.context import RequestContext

from ..dataplane import DataPlane
from ..limits import PLAIN_REQUEST_MAX_BYTES, REQUEST_OVERHEAD_BYTES, request_limits
from ..registry import ModelRegistry
from ..security import Security, subject_of_der
from . import documents
from .codec import encode_response, json_object, wire_request
from .routes import METHODS, Route, route

log = logging.getLogger(__name__)

HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNKNOWN: 400,
    grpc.StatusCode.ALREADY_EXISTS: 400,
    grpc.StatusCode.CANCELLED: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.ABORTED: 409,
}

# JSON spells a tensor element in more bytes than its raw form: "false," is 6 bytes for a
# 1-byte BOOL, a float32 written as a double up to 25; 16x the model's raw bound leaves room
# for spaces and nesting. The JSON part is also bounded by --http-max-input-size.
JSON_FACTOR = 16
INFERENCE_HEADER = "Inference-Header-Content-Length"
_JSON = "application/json"
# Probes are answered whatever the load and during shutdown (when they say "not ready").
_PROBES = ("live", "ready", "model_ready")


def _reply(status: int, document: Any = None) -> web.Response:
    if document is None:
        return web.Response(status=status)
    return web.Response(
        status=status, body=json.dumps(document, separators=(",", ":")), content_type=_JSON
    )


def error_reply(status: int, message: str) -> web.Response:
    return _reply(status, {"error": message})


class RequestTooLarge(InvalidInput):
    """A body larger than what its operation or model can accept."""


class RestService:
    """Answers each REST request; `handle` is the aiohttp low-level server's handler."""

    def __init__(
        self,
        plane: DataPlane,
        registry: ModelRegistry,
        receive_limit: int,
        max_json_bytes: int,
        max_inflight: int,
        security: Security,
    ) -> None:
        self._plane = plane
        self._security = security
        self._registry = registry
        self._receive_limit = receive_limit
        self._max_json = max_json_bytes
        self._max_inflight = max_inflight
        self._limits: Mapping[str, int | None] = {}
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.closing = False

    def refresh_limits(self) -> None:
        """Bounds each model's requests by what its ready versions can accept (any thread:
        the mapping is replaced whole)."""
        self._limits = request_limits(self._registry.models())

    # ---- the one entry ------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        found = route(request.raw_path.split("?", 1)[0])
        operation = found.operation
        if not operation:
            if found.not_offered:
                return error_reply(501, f"{found.not_offered} is not offered by this server")
            return error_reply(404, "Not Found")
        if request.method != METHODS[operation]:
            return error_reply(405, "Method Not Allowed")
        if operation in _PROBES:
            return await self._operation(operation, found, request)
        if self.closing:
            return error_reply(
                503, "the server is shutting down and has stopped accepting new requests"
            )
        if self.inflight >= self._max_inflight:
            self._plane.refused("rest", "capacity")
            exc = Overloaded(
                f"the server is answering {self.inflight} HTTP requests, its most "
                "(--http-max-inflight); retry after a moment"
            )
            return error_reply(HTTP_STATUS[exc.code], exc.message)
        self.inflight += 1
        self.idle.clear()
        try:
            return await self._operation(operation, found, request)
        finally:
            self.inflight -= 1
            if not self.inflight:
                self.idle.set()

    def _context(self, operation: str, request: web.BaseRequest) -> RequestContext:
        headers = {key.lower(): value for key, value in request.headers.items()}
        context = RequestContext("rest", operation, headers, None)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if isinstance(peer, tuple) and len(peer) >= 2:  # host:port, as gRPC spells it
            host = f"[{peer[0]}]" if ":" in str(peer[0]) else str(peer[0])
            context.peer = f"{host}:{peer[1]}"
        else:
            context.peer = request.remote or ""
        tls = request.transport.get_extra_info("ssl_object") if request.transport else None
        if tls is not None:
            der = tls.getpeercert(binary_form=True)
            context.client_certificate = subject_of_der(der) if der else ""
        return context

    async def _operation(
        self, operation: str, found: Route, request: web.BaseRequest
    ) -> web.StreamResponse:
        context = self._context(operation, request)
        try:
            # Who may call this is settled before a body is read.
            context.model = found.model
            self._security.check(context)
            if operation == "infer":
                response = await self._infer(context, found, request)
            else:
                response = await self._plain(context, operation, found, request)
        except TiffinError as exc:
            if isinstance(exc, RequestTooLarge):  # refused before the chain ran
                self._plane.refused("rest", "too_large")
            context.finish(exc.code.name)
            reply = error_reply(HTTP_STATUS.get(exc.code, 500), exc.message)
            if exc.code == grpc.StatusCode.UNAUTHENTICATED:
                reply.headers[hdrs.WWW_AUTHENTICATE] = "Bearer"
            return reply
        except asyncio.CancelledError:
            context.finish(grpc.StatusCode.CANCELLED.name)  # the client went away
            raise
        except Exception as exc:  # a bug in this front door: answered, and logged
            log.exception("REST %s failed", operation)
            context.finish(grpc.StatusCode.INTERNAL.name)
            return error_reply(500, shown(f"{operation} failed: {exc}", 1000))
        context.finish("OK")
        return response

    # ---- everything but inference ---------------------------------------------------------

    async def _plain(
        self, context: RequestContext, operation: str, found: Route, request: web.BaseRequest
    ) -> web.Response:
        plane = self._plane
        model, version = found.model, found.version
        if operation in ("live", "ready"):  # Triton: 200 or 400, no body
            ok = plane.live(context) if operation == "live" else plane.ready(context)
            return _reply(200 if ok else 400)
        if operation == "server_metadata":
            return _reply(200, documents.server_metadata(plane.server_metadata(context)))
        if operation == "model_ready":
            if plane.model_ready(context, model, version):
                return _reply(200)
            return error_reply(400, "Model version not ready")
        if operation == "model_metadata":
            metadata = plane.model_metadata(context, model, version)
            return _reply(200, documents.model_metadata(metadata))
        if operation == "model_config":
            config = plane.model_config(context, model, version)
            return _reply(200, documents.model_config(config))
        if operation == "statistics":
            return _reply(200, documents.statistics(plane.statistics(context, model, version)))
        body = await self._json_body(request, operation)
        if operation == "repository_index":
            ready = body.get("ready", False)
            if type(ready) is not bool:
                raise InvalidInput("Invalid value for 'ready': expected a boolean")
            entries = plane.repository_index(context, found.repository, ready)
            return _reply(200, documents.repository_index(entries))
        parameters = body.get("parameters", {})
        if not isinstance(parameters, dict):
            raise InvalidInput(f"unable to parse 'parameters' of the {operation} request")
        loop = asyncio.get_running_loop()
        if operation == "load":
            await loop.run_in_executor(
                None, plane.load, context, found.repository, model, parameters
            )
        else:
            if parameters.get("unload_dependents"):
                raise Unsupported("'unload_dependents' is not supported by this server")
            await loop.run_in_executor(None, plane.unload, context, found.repository, model)
        return _reply(200)

    async def _json_body(self, request: web.BaseRequest, operation: str) -> dict[str, Any]:
        """The small JSON body of a repository call ({} when empty)."""
        data = await read_body(request, PLAIN_REQUEST_MAX_BYTES, f"a {operation} request")
        if not data:
            return {}
        return json_object(data, f"the {operation} request")

    # ---- inference ----------------------------------------------------------------------

    async def _infer(
        self, context: RequestContext, found: Route, request: web.BaseRequest
    ) -> web.Response:
        if not self._plane.accepting():
            raise ServerNotReady(
                "the server is shutting down and has stopped accepting new requests"
            )
        model = found.model
        header_length = _header_length(request)
        json_limit, binary_limit = self._bounds(model, request.content_length)
        # A compressed body's length says nothing of its parts: checked once inflated.
        encoded = request.headers.get(hdrs.CONTENT_ENCODING, "identity").lower() != "identity"
        length = None if encoded else request.content_length
        if header_length is not None and length is not None:
            _check_parts(model, length, header_length, json_limit, binary_limit)
        elif length is not None and length > json_limit:
            raise RequestTooLarge(
                f"the request for model '{shown(model)}' is {length} bytes of JSON, more than "
                f"the {json_limit} bytes it may take; send large tensors binary "
                f"('binary_data_size', with an {INFERENCE_HEADER} header)"
            )
        limit = json_limit + (binary_limit if header_length is not None else 0)
        body = await read_body(request, limit, f"the request for model '{shown(model)}'")
        if header_length is not None:
            _check_parts(model, len(body), header_length, json_limit, binary_limit)
        wire, binary, default_binary = wire_request(body, header_length, model, found.version)

        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def on_done(pending: Pending) -> None:  # on the thread that answers it
            loop.call_soon_threadsafe(_resolve, done)

        started = self._plane.infer(context, wire, on_done=on_done)
        try:
            await done
        except asyncio.CancelledError:
            started.pending.cancel()  # the client went away: drop the request if it waits
            raise
        trace = context.timeline.trace
        began = time.monotonic_ns() if trace is not None else 0
        header, parts = encode_response(
            started.pending.wait(), started.config, binary, default_binary
        )
        if trace is not None:
            trace.record("encode", began, time.monotonic_ns())
        if not parts:
            return web.Response(body=header, content_type=_JSON)
        return web.Response(
            body=b"".join((header, *parts)),
            content_type="application/octet-stream",
            headers={INFERENCE_HEADER: str(len(header))},
        )

    def _bounds(self, model: str, length: int | None) -> tuple[int, int]:
        """The most bytes of JSON and of binary tensor data a request for `model` may have."""
        if model in self._limits:
            fixed = self._limits[model]
            binary = self._receive_limit if fixed is None else min(fixed, self._receive_limit)
        elif length is not None and length > REQUEST_OVERHEAD_BYTES:
            raise RequestTooLarge(
                f"model '{shown(model)}' is not serving (unknown, or no version is ready yet), "
                f"so a request of {length} bytes for it is refused; check the name, or retry "
                "once the model is ready"
            )
        else:  # the data plane says what is wrong with the model
            binary = REQUEST_OVERHEAD_BYTES
        return min(JSON_FACTOR * binary, self._max_json), binary


def _resolve(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def _header_length(request: web.BaseRequest) -> int | None:
    text = request.headers.get(INFERENCE_HEADER)
    if text is None:
        return None
    if not text.isascii() or not text.strip().isdigit():
        raise InvalidInput(f"Unable to parse {INFERENCE_HEADER}, got: {shown(text)}")
    value = int(text)
    if value == 0:
        raise Unsupported(
            f"{INFERENCE_HEADER}: 0 (the raw binary request form) is not supported; send a "
            "JSON header naming the input, with 'binary_data_size'"
        )
    return value


def _check_parts(
    model: str, length: int, header_length: int, json_limit: int, binary_limit: int
) -> None:
    if header_length > length:
        raise InvalidInput(
            f"{INFERENCE_HEADER} is {header_length}, more than the {length} bytes of the "
            f"request for model '{shown(model)}'"
        )
    if header_length > json_limit:
        raise RequestTooLarge(
            f"the JSON part of the request for model '{shown(model)}' is {header_length} "
            f"bytes, more than the {json_limit} it may take"
        )
    if length - header_length > binary_limit:
        raise RequestTooLarge(
            f"the request for model '{shown(model)}' has {length - header_length} bytes of "
            f"binary tensor data, but the model accepts at most {binary_limit} bytes (its "
            f"largest batch of every input, plus {REQUEST_OVERHEAD_BYTES} bytes)"
        )


async def read_body(request: web.BaseRequest, limit: int, what: str) -> bytearray:
    """The whole body, never more than `limit` bytes held: refused (RequestTooLarge) as
    soon as the declared length, or what arrives (chunked or compressed), passes it."""
    length = request.content_length
    if length is not None and length > limit:
        raise RequestTooLarge(f"{what} is {length} bytes, more than the {limit} it may take")
    if request.headers.get(hdrs.EXPECT, "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # checked: send it
        request.writer.output_size = 0
    encoded = request.headers.get(hdrs.CONTENT_ENCODING, "identity").lower() != "identity"
    # A plain body of known length goes straight into its final buffer; others grow.
    body = bytearray(length) if length is not None and not encoded else bytearray()
    filled = 0
    stream = request.content
    while True:
        chunk = await stream.readany()
        if not chunk:
            break
        end = filled + len(chunk)
        if end > limit:
            raise RequestTooLarge(f"{what} is more than the {limit} bytes it may take")
        body[filled:end] = chunk
        filled = end
    if filled != len(body):  # the connection ended early
        del body[filled:]
    return body
