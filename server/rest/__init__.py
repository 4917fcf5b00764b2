"""The REST front door: KServe v2 HTTP/REST with Triton's extensions, on the data plane.

`RestFrontDoor` is all the rest of the server uses. It serves on a thread of its own with
its own event loop (never the scheduler's), so REST traffic cannot stall the scheduler,
and the gRPC threads never wait on it.

The HTTP stack is aiohttp's low-level server (`aiohttp.web.Server`, no Application or
router: routes.py matches Triton's URL patterns itself), chosen by measurement and by what
it bounds. A fake infer (parse a small JSON request, answer JSON) served on a thread of its
own pinned to one core (`taskset -c 1`), wrk on cpu 0, 5 s per point, two runs each on a
2-core machine with other work on it (load average 1.5-2.4), as ranges:

| stack                             | req/s c=1, 8, 64             | cpu us/req c=1, 8, 64 |
|-----------------------------------|------------------------------|-----------------------|
| aiohttp low-level server (chosen) | 6.2-7.2k, 9.4-15.6k, 15-16k  | 109-115, 63-64, 53-64 |
| uvicorn + httptools, raw ASGI app | 6.3-6.6k, 8.2-8.8k, 13-15k   | 100-103, 63-72, 50-63 |
| uvicorn + httptools + uvloop      | 5.5-6.1k, 9.8-11.9k, 16-18k  | 89-106, 53-55, 46-48  |
| aiohttp low-level + uvloop        | 4.9-5.9k, 10.5-11.2k, 15-19k | 108-141, 67-70, 52-59 |
| aiohttp web.Application + router  | 5.3-5.6k, 6.1-9.3k, 12-13k   | 129-133, 78-104, 61-70 |

aiohttp's low-level server and uvicorn with httptools cost the same per request within the
noise; uvloop takes some 10-15% off uvicorn's cost at high concurrency, as one more
compiled dependency. What decided it is what each bounds: uvicorn's httptools protocol
keeps every header and the whole URL a client sends with no limit (a hostile client grows
the server's memory at will), while aiohttp's parser refuses more than MAX_HEADERS headers
or lines over MAX_LINE_BYTES before any handler runs, reads the body only when the handler
asks (so its size is judged before it is received, `Expect: 100-continue` included),
inflates compressed bodies incrementally, and cancels a handler whose client went away.
aiohttp's Application and router add a third to the cost per request; they are not used.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from aiohttp import web

from ..dataplane import DataPlane
from ..registry import ModelRegistry
from ..security import Security
from ..settings import ServerSettings
from .service import RestService

log = logging.getLogger(__name__)

# aiohttp's parser refuses a request with more headers, or a longer request line or header,
# before any handler runs (400): what a client can make the server hold before its body.
MAX_HEADERS = 128
MAX_LINE_BYTES = 8190
# A connection refused beyond --http-max-connections is closed this long after its answer.
_REFUSED_LINGER_SECONDS = 1.0
# A TLS client that has not finished its handshake by then is disconnected.
_HANDSHAKE_SECONDS = 10.0
# After the grace period, connections still busy get this long to close.
_CLOSE_SECONDS = 1.0


class _ClientErrors(logging.LoggerAdapter):
    """aiohttp logs every malformed request (too many headers, a bad request line) as an
    ERROR with a traceback: a client's bad bytes are not the server's fault, and a hostile
    client must not flood the log, so they go to DEBUG. The handler answers its own errors
    (service.py), so nothing of the server's reaches this."""

    def exception(self, msg: object, *args: Any, exc_info: Any = True, **kw: Any) -> None:
        self.debug(msg, *args, exc_info=exc_info, **kw)


class _Refuse(asyncio.Protocol):
    """A connection beyond the limit: told why, then closed, without reading it."""

    def __init__(self, limit: int) -> None:
        self._limit = limit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        body = (
            f'{{"error":"the server has {self._limit} HTTP connections open, its most '
            '(--http-max-connections); retry after a moment"}'
        ).encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(head + body)
        # Closing with the client's request unread would reset the connection before the
        # client reads the answer: end our side, discard what comes, close in a second.
        if transport.can_write_eof():
            transport.write_eof()
        asyncio.get_running_loop().call_later(_REFUSED_LINGER_SECONDS, transport.close)

    def data_received(self, data: bytes) -> None:
        pass  # a refused connection's request is not read


class RestFrontDoor:
    """An HTTP server for the data plane on its own thread and loop, bound by `start()`,
    stopped by `stop()`."""

    def __init__(
        self,
        plane: DataPlane,
        registry: ModelRegistry,
        settings: ServerSettings,
        receive_limit: int,
        security: Security,
    ) -> None:
        self._ssl = security.https_context()
        self._plane = plane
        self._max_connections = settings.http_max_connections
        self._service = RestService(
            plane,
            registry,
            receive_limit,
            settings.http_max_input_size,
            settings.http_max_inflight,
            security,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="rest-loop", daemon=True
        )
        self._server: web.Server | None = None
        self._listener: asyncio.Server | None = None

    def start(self, host: str, port: int) -> int:
        """Binds and starts serving; the port bound (`port` 0 picks a free one)."""
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(host, port), self._loop)
        try:
            bound = future.result()
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        log.info("listening for HTTP%s on %s:%d", "S" if self._ssl else "", host, bound)
        return bound

    async def _listen(self, host: str, port: int) -> int:
        self._server = web.Server(
            self._service.handle,
            handler_cancellation=True,  # the client went away: its request is dropped
            access_log=None,
            logger=_ClientErrors(logging.getLogger(f"{__name__}.protocol"), {}),
            max_headers=MAX_HEADERS,
            max_line_size=MAX_LINE_BYTES,
            max_field_size=MAX_LINE_BYTES,
        )
        self._listener = await self._loop.create_server(
            self._connection,
            host,
            port,
            ssl=self._ssl,
            ssl_handshake_timeout=_HANDSHAKE_SECONDS if self._ssl else None,
        )
        return int(self._listener.sockets[0].getsockname()[1])

    def _connection(self) -> asyncio.BaseProtocol:
        """A new connection's protocol: aiohttp's, or, beyond --http-max-connections, one that
        answers 503 and closes (each open connection holds a socket and buffers)."""
        assert self._server is not None
        if len(self._server.connections) >= self._max_connections:
            self._plane.refused("rest", "connections")
            return _Refuse(self._max_connections)
        return self._server()

    def models_changed(self) -> None:
        """Request size limits follow the models that serve."""
        self._service.refresh_limits()

    def begin_shutdown(self) -> None:
        """New requests (but health probes, which say not ready) get 503 from now on."""
        self._service.closing = True

    def stop(self, grace: float) -> None:
        """Waits up to `grace` seconds for requests in flight, then closes every connection
        and ends the loop's thread."""
        if self._thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self._close(grace), self._loop)
            try:
                future.result(timeout=grace + _CLOSE_SECONDS + 5)
            except Exception:  # closing must not keep the server from stopping
                log.exception("closing the HTTP server failed")
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    async def _close(self, grace: float) -> None:
        self._service.closing = True
        try:
            await asyncio.wait_for(self._service.idle.wait(), grace)
        except TimeoutError:
            log.warning(
                "%d HTTP request(s) still in flight after %.0f s; closing their connections",
                self._service.inflight,
                grace,
            )
        if self._listener is not None:
            self._listener.close()
        if self._server is not None:
            await self._server.shutdown(_CLOSE_SECONDS)
        if self._listener is not None:
            await self._listener.wait_closed()


__all__ = ["RestFrontDoor"]
