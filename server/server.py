"""The Tiffin server: the model registry, the data plane and its front doors, wired together."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import threading
import time
from importlib import metadata
from typing import TYPE_CHECKING

from tiffin.backends import parse_allowed_backends
from tiffin.scheduler.arena import remove_stale_arenas
from tiffin.scheduler.request import ModelKey
from tiffin.scheduler.statistics import ModelStatistics

from .dataplane import DataPlane, ServerState
from .grpc import GrpcFrontDoor
from .limits import message_limit
from .observability import Metrics, MetricsEndpoint
from .observability.logs import AccessLog
from .poller import RepositoryPoller
from .registry import ModelRegistry
from .repository import ModelSpec
from .rest import RestFrontDoor
from .rollouts import GitSource, Rollouts
from .security import Security
from .settings import ServerSettings

if TYPE_CHECKING:
    from .observability.tracing import Tracing

log = logging.getLogger(__name__)


def _version() -> str:
    try:
        return metadata.version("tiffin")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class Server:
    """Serves a model repository over gRPC and HTTP/REST (both front doors on one data plane).

    `start()` returns once the ports are bound and the repository's models have been
    loaded (or failed to); `stop()` stops taking new calls, lets in-flight ones finish
    within the grace period, then unloads every model.
    """

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.port = 0
        self.http_port = 0  # 0 while REST is off (--no-allow-http)
        self.metrics_port = 0  # 0 while metrics are off (--no-allow-metrics)
        self._state = ServerState()
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(
            target=self._loop.run_forever, name="scheduler-loop", daemon=True
        )
        allowed = parse_allowed_backends(settings.allowed_backends)
        # A repository in git is served from an export of its ref (server/rollouts.py).
        source = GitSource.parse(str(settings.model_repository))
        self._rollouts = Rollouts(source, allowed) if source is not None else None
        root = (
            self._rollouts.first_export()
            if self._rollouts is not None
            else settings.model_repository
        )
        self._registry = ModelRegistry(root, allowed_backends=allowed)
        self.plane = DataPlane(
            self._registry,
            self._loop,
            self._state,
            _version(),
            settings.strict_readiness,
            settings.max_request_elements,
        )
        if self._rollouts is not None:
            self._rollouts.registry = self._registry
            self._rollouts.run_on_loop = lambda change: asyncio.run_coroutine_threadsafe(
                change, self._loop
            ).result()
            self.plane.rollouts = self._rollouts
        # Credentials and certificates are read now: a server does not start on bad ones.
        self.security = Security(settings, root)
        self.security.install(self.plane.chain)
        # Request size limits and health follow every change of what serves.
        self._registry.subscribe(lambda event, key: self._models_changed())
        self._metrics: MetricsEndpoint | None = None
        if settings.allow_metrics:
            metrics = Metrics(self._serving_statistics, shadows=self._registry.shadow_counts)
            self.plane.chain.install("metrics", metrics.intercept)
            self.plane.refused = metrics.refused
            self.security.counted = metrics.refused
            self._registry.subscribe(metrics.model_event)
            self._metrics = MetricsEndpoint(metrics)
        if settings.access_log_sample:
            self.plane.chain.install("access", AccessLog(settings.access_log_sample).intercept)
        self._tracing: Tracing | None = None
        if settings.tracing.enabled:
            # Imported here: a server that does not trace never imports OpenTelemetry.
            from .observability.tracing import Tracing

            self._tracing = Tracing(settings.tracing)
            self.plane.chain.install("tracing", self._tracing.intercept)
            log.info("%s", self._tracing.description)
        self._stopped = threading.Event()
        self._polling: concurrent.futures.Future[None] | None = None  # poll mode's task
        self._grpc: GrpcFrontDoor | None = None
        self._rest: RestFrontDoor | None = None

    @property
    def registry(self) -> ModelRegistry:
        return self._registry

    def _serving_statistics(self) -> list[tuple[ModelKey, ModelStatistics]]:
        keys = [ModelKey(m.name, v) for m in self._registry.models() for v in m.ready_versions()]
        return [(key, self._registry.statistics(key)) for key in keys]

    def start(self) -> None:
        s = self.settings
        if not self._registry.repository.is_dir():
            raise FileNotFoundError(f"model repository {s.model_repository} is not a folder")
        remove_stale_arenas()
        self._loop_thread.start()
        specs = self._registry.read_all()
        # gRPC refuses a larger message from its length prefix, before receiving it: a
        # repository of fixed-size models is not made to buffer a 2 GiB body.
        receive_limit = s.max_message_bytes or message_limit(
            v.config for spec in specs for v in spec.versions if v.config is not None
        )
        log.info("request messages may be up to %d bytes", receive_limit)
        self._grpc = GrpcFrontDoor(self.plane, self._registry, s, receive_limit, self.security)
        self.port = self._grpc.start(s.host, s.grpc_port)
        if s.allow_http:
            self._rest = RestFrontDoor(self.plane, self._registry, s, receive_limit, self.security)
            self.http_port = self._rest.start(s.host, s.http_port)
        if self._metrics is not None:
            self.metrics_port = self._metrics.start(s.host, s.metrics_port)
            log.info("metrics on http://%s:%d/metrics", s.host, self.metrics_port)
        if s.model_control_mode == "explicit":
            specs = _named(specs, s.load_model)
        asyncio.run_coroutine_threadsafe(self._registry.load_all(specs), self._loop).result()
        if s.model_control_mode == "poll":
            poller = RepositoryPoller(self._registry, s.repository_poll_secs)
            asyncio.run_coroutine_threadsafe(poller.remember(), self._loop).result()
            self._polling = asyncio.run_coroutine_threadsafe(poller.run(), self._loop)
            log.info("following the repository's changes every %g s", s.repository_poll_secs)
        self._state.loaded = True
        _quiet_garbage_collector()
        self._models_changed()
        ready = sum(1 for m in self._registry.models() if m.ready_versions())
        log.info(
            "serving %d of %d model(s) from %s",
            ready,
            len(self._registry.models()),
            s.model_repository,
        )

    def _models_changed(self) -> None:
        if self._grpc is not None:
            self._grpc.models_changed()
        if self._rest is not None:
            self._rest.models_changed()

    def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown; safe to call more than once."""
        if self._stopped.is_set() or self._grpc is None:
            return
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        log.info("shutting down: finishing in-flight requests (up to %.0f s)", grace)
        self._state.stopping = True
        self._grpc.begin_shutdown()
        if self._rest is not None:
            self._rest.begin_shutdown()
        began = time.monotonic()
        self._grpc.stop(grace)
        if self._rest is not None:  # in-flight REST requests ran meanwhile: one grace for both
            self._rest.stop(max(0.0, grace - (time.monotonic() - began)))
        if self._polling is not None:
            self._polling.cancel()
        asyncio.run_coroutine_threadsafe(self._registry.unload_all(), self._loop).result()
        if self.security.audit is not None:
            self.security.audit.close()
        if self._metrics is not None:
            self._metrics.stop()
        if self._tracing is not None:
            self._tracing.shutdown()  # exports the spans still queued
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(timeout=5)
        self._stopped.set()
        log.info("stopped")

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until stop() has finished; True if it has."""
        return self._stopped.wait(timeout)


def _named(specs: list[ModelSpec], names: tuple[str, ...]) -> list[ModelSpec]:
    """The models --load-model names ('*': all), with the models their pipelines call."""
    if "*" in names:
        return specs
    by_name = {spec.name: spec for spec in specs}
    missing = sorted(set(names) - by_name.keys())
    if missing:
        raise FileNotFoundError(
            f"--load-model names {', '.join(repr(m) for m in missing)}, which the repository "
            "does not hold"
        )
    wanted: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in wanted or name not in by_name:
            continue  # a missing step is reported when its pipeline loads
        wanted.add(name)
        todo.extend(by_name[name].step_models())
    return [spec for spec in specs if spec.name in wanted]


# Collections of the youngest generation every this many allocations, not CPython's 700:
# a request allocates a few hundred objects, nearly all freed by reference counting, so
# the default ran a collection every few requests. Measured with perf at 3k requests/s of
# a small model on one core: the collector took 5.5% of the server's CPU time before,
# 1.5% after freezing alone, none measurable with this too.
_YOUNG_COLLECTION_EVERY = 20_000


def _quiet_garbage_collector() -> None:
    """Keeps the cyclic garbage collector off the request path: the frameworks and models
    loaded at start live as long as the server, so they move out of its reach (a full
    collection no longer walks them), and young collections run less often."""
    gc.freeze()
    gc.set_threshold(_YOUNG_COLLECTION_EVERY, 20, 20)
