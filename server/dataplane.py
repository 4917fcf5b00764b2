"""The data plane: what the server does, whichever front door (gRPC, REST) a call came in by.

Every operation takes the call's `RequestContext` and runs inside the interceptor chain
(server/interceptors.py), so a front door only decodes, calls one method here, and
encodes the result or the TiffinError. Results are plain Python (dataclasses, the
scheduler's responses, the config model), never protocol messages. Operations are
called from front-door threads; they read the registry's immutable snapshots, and hand
anything that changes state to the scheduler's event loop.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tiffin.protos.errors import (
    InvalidInput,
    NotEnabled,
    ServerNotReady,
    TiffinError,
    UnknownModel,
)
from tiffin.protos.model_config import ModelConfig
from tiffin.protos.names import parse_version, shown
from tiffin.scheduler import InferenceResponse, ModelKey, Pending
from tiffin.scheduler.context import RequestContext
from tiffin.scheduler.statistics import ModelStatistics

from .bridge import LoopBridge
from .interceptors import Chain
from .overrides import parse_override
from .registry import READY, ModelRegistry
from .rollouts import HistoryEntry, Rollouts
from .traffic import TrafficRouter, same_answer
from .validation import WireRequest, validate

SERVER_NAME = "tiffin"
# Only what really works is advertised: perf_analyzer acts on this list.
EXTENSIONS = ["model_configuration", "statistics", "model_repository", "binary_tensor_data"]


@dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: list[int]  # -1 for the batch dimension and variable dims


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


@dataclass(frozen=True)
class ServerMetadata:
    name: str
    version: str
    extensions: list[str]


@dataclass(frozen=True)
class IndexEntry:
    """One row of the repository index: a model version (or a model without versions)."""

    name: str
    version: str
    state: str
    reason: str


@dataclass(frozen=True)
class Started:
    """A request on its way: wait on `pending`; `config` encodes its response."""

    pending: Pending
    config: ModelConfig


class ServerState:
    """Whether the server is ready, shared between the Server and the data plane."""

    def __init__(self) -> None:
        self.loaded = False  # the repository's first load has finished
        self.stopping = False

    def check_accepting(self) -> None:
        if self.stopping:
            raise ServerNotReady(
                "the server is shutting down and has stopped accepting new requests"
            )


class DataPlane:
    """Protocol-neutral operations; each runs through the interceptor chain."""

    def __init__(
        self,
        registry: ModelRegistry,
        loop: asyncio.AbstractEventLoop,
        state: ServerState,
        version: str,
        strict_readiness: bool,
        max_request_elements: int = 0,
    ) -> None:
        self.chain = Chain()
        self.rollouts: Rollouts | None = None  # set when the repository comes from git
        # Told of each call a front door refuses before the chain sees it (protocol,
        # reason): the metrics count them, which the chain's interceptors cannot.
        self.refused: Callable[[str, str], None] = lambda protocol, reason: None
        self._max_elements = max_request_elements
        self._registry = registry
        self._bridge = LoopBridge(loop, registry.submit, registry.enqueue)
        self._state = state
        self._version = version
        self._strict = strict_readiness

    @property
    def repository_name(self) -> str:
        return self._registry.repository.name

    # ---- health ---------------------------------------------------------------------------

    def accepting(self) -> bool:
        """False once shutdown has begun."""
        return not self._state.stopping

    def live(self, context: RequestContext) -> bool:
        return self.chain.run(context, lambda: not self._state.stopping)

    def ready(self, context: RequestContext) -> bool:
        return self.chain.run(context, self.is_ready)

    def is_ready(self) -> bool:
        """Ready for traffic: loaded, not stopping, and (strict) every model ready."""
        if not self._state.loaded or self._state.stopping:
            return False
        return self._registry.all_ready() if self._strict else True

    def model_ready(self, context: RequestContext, name: str, version: str) -> bool:
        """Whether the model (version) takes requests: False for a known model that is
        loading, unloaded or unavailable; UnknownModel for a name never seen (Triton)."""

        def ready() -> bool:
            state = self._registry.state(name)
            number = _version_number(version)
            if number is None:
                wanted = state.ready_versions()
            else:
                found = state.versions.get(number)
                wanted = [number] if found is not None and found.state == READY else []
            return bool(wanted) and not self._state.stopping

        context.model = name
        return self.chain.run(context, ready)

    # ---- metadata -------------------------------------------------------------------------

    def server_metadata(self, context: RequestContext) -> ServerMetadata:
        return self.chain.run(
            context, lambda: ServerMetadata(SERVER_NAME, self._version, list(EXTENSIONS))
        )

    def model_metadata(self, context: RequestContext, name: str, version: str) -> ModelMetadata:
        def metadata() -> ModelMetadata:
            config = self._config(name, version)
            versions = (
                [version]
                if version
                else [str(v) for v in self._registry.state(name).ready_versions()]
            )
            batch = [-1] if config.batching else []
            return ModelMetadata(
                name=config.name,
                versions=versions,
                platform=config.platform or config.backend,
                inputs=[TensorMetadata(t.name, t.datatype, batch + t.dims) for t in config.inputs],
                outputs=[
                    TensorMetadata(t.name, t.datatype, batch + t.dims) for t in config.outputs
                ],
            )

        context.model = name
        return self.chain.run(context, metadata)

    def model_config(self, context: RequestContext, name: str, version: str) -> ModelConfig:
        context.model = name
        return self.chain.run(context, lambda: self._config(name, version))

    def _config(self, name: str, version: str) -> ModelConfig:
        config = self._registry.resolve(name, version).spec.config
        assert config is not None
        return config

    def statistics(
        self, context: RequestContext, name: str, version: str
    ) -> list[tuple[ModelKey, ModelStatistics]]:
        """Statistics of the named model's ready versions (one if `version` is given), or of
        every ready version of every model when `name` is empty."""

        def keys() -> list[ModelKey]:
            if not name:
                return [
                    ModelKey(s.name, v) for s in self._registry.models() for v in s.ready_versions()
                ]
            if version:
                return [ModelKey(name, self._registry.resolve(name, version).spec.version)]
            return [ModelKey(name, v) for v in self._registry.state(name).ready_versions()]

        context.model = name
        return self.chain.run(context, lambda: [(k, self._registry.statistics(k)) for k in keys()])

    # ---- repository -----------------------------------------------------------------------

    def repository_index(
        self, context: RequestContext, repository: str, ready_only: bool
    ) -> list[IndexEntry]:
        def index() -> list[IndexEntry]:
            self._check_repository(repository)
            entries = []
            for model in self._registry.models():
                if not model.versions:
                    if not ready_only:
                        entries.append(IndexEntry(model.name, "", "UNAVAILABLE", model.error))
                    continue
                router = self._registry.router(model.name)
                for number, version in sorted(model.versions.items()):
                    if ready_only and version.state != READY:
                        continue
                    reason = version.reason
                    if router is not None and number in router.rolled_back:
                        reason = f"rolled back: {router.rolled_back[number]}"
                    entries.append(IndexEntry(model.name, str(number), version.state, reason))
            return entries

        return self.chain.run(context, index)

    def load(
        self, context: RequestContext, repository: str, name: str, parameters: dict[str, Any]
    ) -> None:
        """(Re)loads a model from its folder in the repository."""

        def load() -> None:
            self._state.check_accepting()
            self._check_repository(repository)
            if set(parameters) == {"traffic"}:  # new weights, nothing reloaded
                weights = parse_weights(parameters["traffic"])
                self._bridge.call(self._registry.set_traffic(name, weights))
                return
            override = parse_override(parameters)
            self._bridge.call(self._registry.load(name, override))

        context.model = name
        self.chain.run(context, load)

    def unload(self, context: RequestContext, repository: str, name: str) -> None:
        def unload() -> None:
            self._check_repository(repository)
            self._bridge.call(self._registry.unload(name))

        context.model = name
        self.chain.run(context, unload)

    # ---- rollouts from git ------------------------------------------------------------------

    def rollout(self, context: RequestContext, ref: str) -> HistoryEntry:
        """Moves the server to a ref of its git source (server/rollouts.py has the steps)."""
        context.model = ref[:80]
        return self.chain.run(
            context, lambda: self._rollouts_or_refuse().rollout(ref, context.principal)
        )

    def rollback(self, context: RequestContext) -> HistoryEntry:
        return self.chain.run(
            context, lambda: self._rollouts_or_refuse().rollback(context.principal)
        )

    def rollout_history(self, context: RequestContext) -> list[HistoryEntry]:
        return self.chain.run(context, lambda: self._rollouts_or_refuse().history())

    def traffic_state(self, context: RequestContext) -> list[dict[str, Any]]:
        """Every traffic split as it stands: live weights, rolled-back versions, the shadow
        candidate and its comparisons."""

        def state() -> list[dict[str, Any]]:
            splits = []
            for model in self._registry.models():
                router = self._registry.router(model.name)
                if router is None:
                    continue
                shadow = router.traffic.shadow
                splits.append(
                    {
                        "model": model.name,
                        "weights": {str(v): w for v, w in sorted(router.weights.items())},
                        "rolled_back": {str(v): r for v, r in router.rolled_back.items()},
                        "shadow": {"version": shadow.version, "share": shadow.share}
                        if shadow
                        else None,
                        "shadow_comparisons": dict(router.shadowed) if shadow else {},
                    }
                )
            return splits

        return self.chain.run(context, state)

    def _rollouts_or_refuse(self) -> Rollouts:
        self._state.check_accepting()
        if self.rollouts is None:
            raise NotEnabled(
                "this server does not serve a git repository, so it has no rollouts; start "
                "it with --model-repository git+file:///PATH/TO/REPO.git@REF"
            )
        return self.rollouts

    def _check_repository(self, name: str) -> None:
        if name and name != self.repository_name:
            raise InvalidInput(
                f"unknown repository '{shown(name)}'; this server serves '{self.repository_name}'"
            )

    # ---- inference ------------------------------------------------------------------------

    def infer(
        self,
        context: RequestContext,
        request: WireRequest,
        on_done: Callable[[Pending], None] | None = None,
    ) -> Started:
        """Validates and queues a request. Wait on the result's `pending`, or pass `on_done`,
        which runs (on the thread that answers it) once the request is answered."""
        context.model = request.model_name
        context.id = request.id  # known before the model is resolved: access lines show it

        def start() -> Started:
            self._state.check_accepting()
            router = self._registry.router(request.model_name)
            sticky = None
            if router is not None and router.traffic.sticky_key and not request.model_version:
                name = router.traffic.sticky_key
                value = request.parameters.get(name, context.metadata.get(name))
                sticky = None if value is None else str(value)
            spec = self._registry.resolve(request.model_name, request.model_version, sticky).spec
            config = spec.config
            assert config is not None
            key = ModelKey(request.model_name, spec.version)
            decoded = validate(request, key, config, context, self._max_elements)
            done = on_done
            if router is not None and router.traffic.shadow and not request.model_version:
                ready = self._registry.state(request.model_name).ready_versions()
                shadow = router.shadow_for(spec.version, ready)
                if shadow is not None:
                    done = self._mirror(request, router, shadow, on_done)
            self._watch(router, spec.version, context)
            return Started(self._bridge.submit(decoded, done), config)

        return self.chain.run(context, start)

    @staticmethod
    def _watch(router: TrafficRouter | None, version: int, context: RequestContext) -> None:
        """A canary's answers are judged by its rollback rule as they finish."""
        if router is not None and router.watches(version):
            context.on_finish.append(
                lambda c: router.observe(
                    version, c.status, c.timeline.between("received", "sent") / 1e9
                )
            )

    def _mirror(
        self,
        request: WireRequest,
        router: TrafficRouter,
        version: int,
        on_done: Callable[[Pending], None] | None,
    ) -> Callable[[Pending], None] | None:
        """Sends a copy of `request` to the shadow `version`; the `on_done` to give the
        client's own request, which compares the two answers once both are in. The copy has
        a context of its own: it is not counted, limited or traced as a client's request."""
        rule = router.traffic.shadow
        assert rule is not None
        try:
            shadow_spec = self._registry.resolve(request.model_name, str(version)).spec
            assert shadow_spec.config is not None
            key = ModelKey(request.model_name, version)
            copy = validate(request, key, shadow_spec.config, RequestContext("shadow", "infer"))
        except TiffinError:  # the candidate cannot take this request: counted as an error
            router.compared(None)
            return on_done
        answers: dict[str, dict[str, Any] | None] = {}
        lock = threading.Lock()

        def settle(which: str, pending: Pending) -> None:
            with lock:
                answers[which] = pending.response.outputs if pending.response else None
                if len(answers) < 2:
                    return
            primary, shadow = answers["primary"], answers["shadow"]
            if primary is not None:  # the client's own request failed: nothing to compare
                difference = (
                    None if shadow is None else same_answer(primary, shadow, rule.rtol, rule.atol)
                )
                router.compared(difference)

        def primary_done(pending: Pending) -> None:
            settle("primary", pending)
            if on_done is not None:
                on_done(pending)

        self._bridge.submit(copy, lambda pending: settle("shadow", pending))
        return primary_done


def parse_weights(value: Any) -> dict[int, int]:
    """Traffic weights from a load call's `traffic` parameter: "1=90,2=10" or a JSON object
    {"1": 90, "2": 10}; InvalidInput saying the form otherwise."""
    text = str(value).strip()
    try:
        if text.startswith("{"):
            pairs = [(str(k), str(v)) for k, v in json.loads(text).items()]
        else:
            pairs = [
                (part.split("=", 1)[0], part.split("=", 1)[1])
                for part in text.split(",")
                if part.strip()
            ]
        weights = {int(v.strip()): int(w.strip()) for v, w in pairs}
    except (ValueError, TypeError, AttributeError, IndexError):
        raise InvalidInput(
            f'traffic \'{shown(text)}\' is not weights such as "1=90,2=10" or {{"1": 90, "2": 10}}'
        ) from None
    if not weights or len(weights) > 1000:
        raise InvalidInput("traffic must give weights for 1 to 1000 versions")
    return weights


def _version_number(text: str) -> int | None:
    """A version string's number (None for ""); InvalidInput when it is not a version."""
    try:
        return parse_version(text)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None


__all__ = [
    "DataPlane",
    "IndexEntry",
    "InferenceResponse",
    "ModelMetadata",
    "Pending",
    "RequestContext",
    "ServerMetadata",
    "ServerState",
    "Started",
    "TensorMetadata",
    "UnknownModel",
    "WireRequest",
]
