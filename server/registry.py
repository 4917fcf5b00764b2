"""The model registry: the one owner of which model versions exist, their states, configs
and executors, and of which executor serves a request.

A (re)load builds the new executors beside the old ones; once they are ready, one
assignment publishes the model's new state, so traffic moves atomically; the executors
it replaced then finish their queues and unload. A version that fails to load leaves
the one it would have replaced serving, with the reason in its state. Pipelines are
re-checked whenever a model they call changes: one that can no longer run is UNAVAILABLE
with the reason, and READY again once its steps are back.

Changes run on the scheduler's event loop, one model at a time; lookups (`resolve`,
`models`, `state`) may come from any thread and read immutable snapshots. Subscribers
(`subscribe`) hear of every change: what later features (metrics, health) hang on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from tiffin.protos.errors import (
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    TiffinError,
    UnknownModel,
)
from tiffin.protos.model_config import ModelConfig, Traffic
from tiffin.protos.names import name_problem, parse_version, shown
from tiffin.scheduler import (
    Executor,
    InferenceRequest,
    InferenceResponse,
    ModelKey,
    Pending,
    Scheduler,
)
from tiffin.scheduler.statistics import ModelStatistics

from .overrides import Override, StagingArea
from .pipelines import StepModel, complete_pipeline, step_configs
from .repository import ModelSpec, VersionSpec, read_model, read_repository
from .traffic import TrafficRouter
from .warmup import WarmupFailed, warm_up

log = logging.getLogger(__name__)

READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"
# What subscribers hear, with the model version it concerns.
LOADED, SWAPPED, UNLOADED, FAILED = "loaded", "swapped", "unloaded", "failed"
ROLLED_BACK = "rolled_back"


@dataclass(frozen=True)
class VersionState:
    """A version's lifecycle state, with the reason when it is not READY (or when a reload
    of it failed and it keeps serving), and the executor serving it while READY."""

    spec: VersionSpec
    state: str
    reason: str = ""
    executor: Executor | None = None


@dataclass(frozen=True)
class ModelState:
    """A model as the registry knows it; replaced whole on every change."""

    name: str
    error: str  # why the model as a whole is unavailable, if it is
    versions: dict[int, VersionState]

    def ready_versions(self) -> list[int]:
        return sorted(v for v, s in self.versions.items() if s.state == READY)


Subscriber = Callable[[str, ModelKey], None]


class SwitchFailed(Exception):
    """A repository switch that could not load a model; nothing was changed."""


class ModelRegistry:
    """Owns the repository's models, their versions and the executors serving them.

    `allowed_backends` lists the backends by import path that configs may name (`module:Class`
    or `module`); None reads TIFFIN_ALLOWED_BACKENDS each time the repository is read.
    """

    def __init__(self, repository: Path, allowed_backends: Sequence[str] | None = None) -> None:
        self.repository = repository
        self._allowed_backends = allowed_backends
        self._models: dict[str, ModelState] = {}
        self._specs: dict[str, ModelSpec] = {}  # as last read, pipelines re-checked from it
        self._scheduler = Scheduler(self.resolve_loaded, self.enqueue)
        self._subscribers: list[Subscriber] = []
        self._changing: dict[str, asyncio.Lock] = {}
        self._routers: dict[str, TrafficRouter] = {}  # models whose config has `traffic`
        self._staging = StagingArea()  # models laid out from load calls' config and files
        self._staged: dict[str, set[Path]] = {}  # model -> staging folders it serves from
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop changes run on

    def subscribe(self, subscriber: Subscriber) -> None:
        """`subscriber(event, key)` is called (on the loop) after every change."""
        self._subscribers.append(subscriber)

    # ---- reading (any thread) -------------------------------------------------------------

    def read_all(self) -> list[ModelSpec]:
        """Reads every model folder of the repository (nothing is loaded)."""
        return read_repository(self.repository, self._allowed_backends)

    def models(self) -> list[ModelState]:
        return [self._models[n] for n in sorted(self._models)]

    def all_ready(self) -> bool:
        return all(
            not s.error and s.versions and all(v.state == READY for v in s.versions.values())
            for s in self._models.values()
        )

    def state(self, name: str) -> ModelState:
        state = self._models.get(name)
        if state is None:
            raise UnknownModel(f"Request for unknown model: '{shown(name)}' is not found")
        return state

    def shadow_counts(self) -> list[tuple[ModelKey, dict[str, int]]]:
        """Each shadow candidate's comparisons so far (match, mismatch, error)."""
        return [
            (ModelKey(name, router.traffic.shadow.version), dict(router.shadowed))
            for name, router in list(self._routers.items())
            if router.traffic.shadow is not None
        ]

    def router(self, name: str) -> TrafficRouter | None:
        """The model's traffic split, if its config has one."""
        return self._routers.get(name)

    def resolve(self, name: str, version: str, sticky: str | None = None) -> VersionState:
        """The READY version that should serve a call, with Triton's errors when there is
        none ("" asks for the traffic split's choice, or else the newest; `sticky` is the
        caller's sticky key)."""
        state = self.state(name)
        if version == "":
            ready = state.ready_versions()
            router = self._routers.get(name)
            chosen = router.choose(ready, sticky) if router is not None else None
            if chosen is not None:
                return state.versions[chosen]
            if not ready:
                known = {s.reason for s in state.versions.values() if s.reason}
                reasons = "; ".join(sorted(known | ({state.error} if state.error else set())))
                raise ModelNotFound(
                    f"Request for unknown model: '{name}' has no available versions"
                    + (f" ({shown(reasons, 500)})" if reasons else "")
                )
            return state.versions[ready[-1]]
        try:
            number = parse_version(version)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        assert number is not None  # "" was handled above
        found = state.versions.get(number)
        if found is None:
            raise ModelNotFound(
                f"Request for unknown model: '{name}' version {number} is not found"
            )
        if found.state != READY:
            raise ModelNotReady(
                f"Request for unknown model: '{name}' version {number} is not at ready state"
                + (f" ({found.reason})" if found.reason else "")
            )
        return found

    def statistics(self, key: ModelKey) -> ModelStatistics:
        """A snapshot of the serving executor's statistics (zeros if none serves)."""
        state = self._models.get(key.name)
        found = state.versions.get(key.version) if state else None
        executor = found.executor if found else None
        return executor.statistics.snapshot() if executor else ModelStatistics()

    # ---- routing ----------------------------------------------------------------------------

    def submit(self, pending: Pending) -> bool:
        """From any thread: queues a request with the executor serving its version now, if
        that executor takes requests from any thread (see ModelExecutor.submit), and
        returns True; False when it must be queued on the loop with `enqueue`.

        The registry publishes a swap before it stops the executor it retired, so a
        request that met a retired executor finds its successor when it looks again.
        """
        request = pending.request
        while True:
            executor = self._executor_for(request)
            submit = getattr(executor, "submit", None)
            if submit is None:
                return False
            try:
                submit(pending)
                return True
            except ModelNotReady:
                if self._executor_for(request) is executor:
                    raise
                # Retired between resolving and queueing: go to the one serving now.

    def enqueue(self, request: InferenceRequest) -> asyncio.Future[InferenceResponse]:
        """On the loop: queues a request with the executor serving its version now."""
        return self._executor_for(request).enqueue(request)

    def _executor_for(self, request: InferenceRequest) -> Executor:
        """The executor serving the request's version now.

        A request validated just before a swap may arrive after it: a reloaded version is
        served by its new executor; a request that named no version, for a version the
        swap retired, goes to the newest version when that takes the same inputs.
        """
        state = self._models.get(request.model.name)
        found = state.versions.get(request.model.version) if state else None
        if found is None or found.executor is None:
            found = self._successor(state, request)
            if found is None or found.executor is None:
                raise ModelNotReady(
                    f"model '{request.model.name}' version {request.model.version} was "
                    "unloaded while the request was on its way; retry it"
                )
            request.model = ModelKey(request.model.name, found.spec.version)
        return found.executor

    @staticmethod
    def _successor(state: ModelState | None, request: InferenceRequest) -> VersionState | None:
        if state is None or request.pinned or not state.ready_versions():
            return None
        newest = state.versions[state.ready_versions()[-1]]
        old = request.config
        config = newest.executor.config if newest.executor else None
        if old is None or config is None or config.inputs != old.inputs:
            return None
        if config.max_batch_size != old.max_batch_size:
            return None
        return newest

    def resolve_loaded(self, name: str, version: int = -1) -> tuple[ModelKey, ModelConfig]:
        """For pipeline steps: the READY version (-1: the newest) and its config."""
        state = self._models.get(name)
        if state is None:
            raise ModelNotReady(f"model '{name}' is not loaded")
        ready = state.ready_versions()
        if version == -1:
            if not ready:
                raise ModelNotReady(f"model '{name}' has no loaded version")
            version = ready[-1]
        elif version not in ready:
            raise ModelNotReady(f"model '{name}' version {version} is not loaded")
        executor = state.versions[version].executor
        assert executor is not None
        return ModelKey(name, version), executor.config

    # ---- changing (on the loop) -----------------------------------------------------------

    async def load_all(self, specs: list[ModelSpec] | None = None) -> None:
        """Loads every model of the repository (as `read_all` read it, or reads it now),
        several at once; pipelines after the models their steps call."""
        if specs is None:
            specs = await asyncio.to_thread(self.read_all)
        pending = {s.name: s for s in specs if s.step_models()}
        await asyncio.gather(*(self._load(s) for s in specs if s.name not in pending))
        while pending:
            ready = [s for s in pending.values() if not (s.step_models() & pending.keys())]
            # A cycle of pipelines: load them anyway, each then reports its missing steps.
            batch = ready or list(pending.values())
            for spec in batch:
                del pending[spec.name]
            await asyncio.gather(*(self._load(s) for s in batch))

    async def load(self, name: str, override: Override | None = None) -> None:
        """(Re)reads one model folder and loads it; the old versions serve until the new
        are up, and keep serving if the new fail.

        `name` comes from a client: it is checked as a model name (one path component)
        before it touches the disk, so only a folder of the repository is ever read.
        InvalidInput when the name is not a model name, has no folder, or fails to load.
        """
        problem = name_problem(name)
        if problem:
            raise InvalidInput(f"failed to load: {problem}")
        if override is not None:  # laid out in the staging area: the repository is not written
            spec = await asyncio.to_thread(
                self._staging.lay_out, name, override, self.repository, self._allowed_backends
            )
        else:
            path = self.repository / name
            if not path.is_dir():
                raise InvalidInput(f"failed to load '{name}': no model folder {path}")
            spec = await asyncio.to_thread(read_model, path, self._allowed_backends)
        failures = await self._load(spec)
        # A staging folder is removed once no version serves from it (_load has waited for
        # retired executors to stop); a worker that restarts reads its model files again.
        folders = self._staged.pop(name, set()) | ({spec.path} if override else set())
        serving = {folder for folder in folders if self._serves_from(name, folder)}
        for folder in folders - serving:
            self._staging.remove(folder)
        if serving:
            self._staged[name] = serving
        if failures:
            raise InvalidInput(f"failed to load '{name}': " + "; ".join(failures))

    def _serves_from(self, name: str, folder: Path) -> bool:
        state = self._models.get(name)
        return state is not None and any(
            v.state == READY and v.spec.path.is_relative_to(folder) for v in state.versions.values()
        )

    async def unload(self, name: str) -> None:
        """Unloads every version of a model; it stays known, as UNAVAILABLE. InvalidInput
        when `name` is not a model name or not a model this server knows."""
        problem = name_problem(name)
        if problem:
            raise InvalidInput(f"failed to unload: {problem}")
        if name not in self._models:
            raise UnknownModel(f"Request for unknown model: '{shown(name)}' is not found")
        async with self._lock(name):
            await self._retire_all(name, "unloaded")
            for folder in self._staged.pop(name, set()):
                self._staging.remove(folder)
        await self._recheck_pipelines(name)

    async def unload_all(self) -> None:
        await asyncio.gather(
            *(self._retire_all(name, "server shutting down") for name in list(self._models))
        )
        self._staging.clear()

    def _lock(self, name: str) -> asyncio.Lock:
        return self._changing.setdefault(name, asyncio.Lock())

    async def _load(self, spec: ModelSpec, keep_serving: bool = True) -> list[str]:
        """Loads a model as read; the reasons any of its versions failed. With
        `keep_serving`, a version that fails to load leaves the one it would replace
        serving (not for a pipeline whose steps changed: the old one cannot run)."""
        async with self._lock(spec.name):
            failures = await self._load_locked(spec, keep_serving)
        await self._recheck_pipelines(spec.name)
        return failures

    async def _load_locked(self, spec: ModelSpec, keep_serving: bool) -> list[str]:
        name = spec.name
        self._loop = asyncio.get_running_loop()
        self._specs[name] = spec
        old = self._models.get(name) or ModelState(name, "", {})
        serving = {v: s for v, s in old.versions.items() if s.state == READY}
        kept = serving if keep_serving else {}
        if spec.error:
            log.error("model '%s' is UNAVAILABLE: %s", name, spec.error)
            if kept:
                self._publish(self._still_serving(old, spec.error))
                return [spec.error]
            self._publish(ModelState(name, spec.error, {}))
            self._notify(FAILED, ModelKey(name, 0))
            return [spec.error]

        # New versions show LOADING meanwhile; versions already serving keep serving.
        loading = dict(old.versions)
        for v in spec.versions:
            if v.config and v.version not in serving:
                loading[v.version] = VersionState(v, LOADING)
        self._publish(ModelState(name, "", loading))
        built = await asyncio.gather(*(self._build(name, v) for v in spec.versions if v.config))
        new_states = {state.spec.version: state for state in built}

        versions: dict[int, VersionState] = {}
        failures: list[str] = []
        for v in spec.versions:
            state = new_states.get(v.version) or VersionState(v, UNAVAILABLE, v.error)
            if state.state != READY:
                failures.append(f"version {v.version}: {state.reason}")
                log.error("model '%s' version %d is UNAVAILABLE: %s", name, v.version, state.reason)
                previous = kept.get(v.version)
                if previous is not None:  # a failed reload leaves the old executor serving
                    state = replace(
                        previous, reason=f"reload failed, still serving: {state.reason}"
                    )
            versions[v.version] = state
        if not any(s.state == READY for s in versions.values()) and kept:
            # Nothing new serves: the versions serving before keep serving.
            for number, previous in kept.items():
                versions.setdefault(
                    number, replace(previous, reason="a reload selected no version that loads")
                )
        retired = [
            s.executor
            for number, s in serving.items()
            if s.executor is not None
            and (number not in versions or versions[number].executor is not s.executor)
        ]
        self._publish(ModelState(name, "", versions))
        self._route(spec)
        for number, state in versions.items():
            if state.state == READY and number not in serving:
                self._notify(LOADED, ModelKey(name, number))
            elif state.state == READY and state.executor is not serving[number].executor:
                self._notify(SWAPPED, ModelKey(name, number))
        for number in serving:
            if number not in versions or versions[number].state != READY:
                self._notify(UNLOADED, ModelKey(name, number))
        await self._stop(retired)
        return failures

    async def switch(self, root: Path, changed: list[ModelSpec], removed: list[str]) -> None:
        """Serves the repository at `root` instead: every changed model's versions are built
        and warmed first, beside what serves; only when all are READY do they take over, all
        in one step on the loop (no request sees half a switch), and `removed` models unload.
        SwitchFailed naming the model and version when any fails; nothing changes then."""
        self._loop = asyncio.get_running_loop()
        built: list[tuple[ModelSpec, list[VersionState]]] = []
        try:
            for spec in sorted(changed, key=lambda s: bool(s.step_models())):
                states = list(
                    await asyncio.gather(*(self._build(spec.name, v) for v in spec.versions))
                )
                built.append((spec, states))
                for state in states:
                    if state.state != READY:
                        raise SwitchFailed(
                            f"model '{spec.name}' version {state.spec.version}: {state.reason}"
                        )
        except BaseException:
            await self._stop([s.executor for _, states in built for s in states if s.executor])
            raise
        retired: list[Executor] = []
        events: list[tuple[str, ModelKey]] = []
        for spec, states in built:  # no await from here to the last publish
            old = self._models.get(spec.name)
            if old is not None:
                retired += [v.executor for v in old.versions.values() if v.executor]
                events += [(UNLOADED, ModelKey(spec.name, n)) for n in old.ready_versions()]
            self._specs[spec.name] = spec
            self._publish(ModelState(spec.name, "", {s.spec.version: s for s in states}))
            self._route(spec)
            events += [(LOADED, ModelKey(spec.name, s.spec.version)) for s in states]
        for name in removed:
            old = self._models.pop(name, None)
            self._specs.pop(name, None)
            self._routers.pop(name, None)
            if old is not None:
                retired += [v.executor for v in old.versions.values() if v.executor]
                events += [(UNLOADED, ModelKey(name, n)) for n in old.ready_versions()]
        self.repository = root
        for event, key in events:
            self._notify(event, key)
        await self._stop(retired)
        for spec, _ in built:
            await self._recheck_pipelines(spec.name)

    def _route(self, spec: ModelSpec) -> None:
        """The model's traffic split as its config (re)read says: a reload is an operator's
        word, so it replaces live weights and clears rollbacks."""
        traffic = next((v.config.traffic for v in spec.versions if v.config), None)
        if traffic is None:
            self._routers.pop(spec.name, None)
            return
        self._routers[spec.name] = TrafficRouter(
            spec.name, traffic, lambda version, reason: self._rolled_back(spec.name, version)
        )
        log.info("model '%s' traffic: %s", spec.name, _weights_text(traffic.weights))

    def _rolled_back(self, name: str, version: int) -> None:
        """A router took a canary out (on the thread that answered): heard on the loop."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._notify, ROLLED_BACK, ModelKey(name, version))

    async def set_traffic(self, name: str, weights: dict[int, int]) -> None:
        """An admin's new weights for a model's loaded versions (clearing rollbacks)."""
        state = self.state(name)
        unknown = sorted(set(weights) - set(state.ready_versions()))
        if unknown:
            raise InvalidInput(
                f"traffic for '{name}' names version {unknown[0]}, which is not loaded (loaded: "
                f"{', '.join(map(str, state.ready_versions())) or 'none'})"
            )
        if not sum(weights.values()) or any(w < 0 for w in weights.values()):
            raise InvalidInput("traffic weights must be 0 or more, and some above 0")
        router = self._routers.get(name)
        if router is None:
            router = TrafficRouter(name, Traffic(weights=weights), lambda v, r: None)
            self._routers[name] = router
        router.set_weights(weights)
        log.info("model '%s' traffic set: %s", name, _weights_text(weights))

    def _still_serving(self, old: ModelState, reason: str) -> ModelState:
        return ModelState(
            old.name,
            "",
            {
                v: replace(s, reason=f"reload failed, still serving: {reason}")
                if s.state == READY
                else s
                for v, s in old.versions.items()
            },
        )

    async def _build(self, name: str, spec: VersionSpec) -> VersionState:
        """Creates and starts a version's executor; its state, READY or UNAVAILABLE."""
        config = spec.config
        assert config is not None
        key = ModelKey(name, spec.version)
        try:
            if config.pipeline is not None:
                config = complete_pipeline(config, self._step_configs(spec))
                spec = replace(spec, config=config)
            executor = self._scheduler.create_executor(key, config, spec.path)
            await executor.start()
            if executor.config is not config:  # completed at start (kind auto's choice)
                config = executor.config
                spec = replace(spec, config=config)
        except Exception as exc:  # any failure to load makes only this version unavailable
            message = exc.message if isinstance(exc, TiffinError) else str(exc)
            return VersionState(spec, UNAVAILABLE, f"failed to load: {message}")
        if config.model_warmup:
            try:
                await warm_up(executor, key, executor.config, spec.path)
            except WarmupFailed as exc:
                await executor.stop()
                log.error("model '%s' version %d: %s", name, spec.version, exc)
                return VersionState(spec, UNAVAILABLE, str(exc))
            log.info(
                "model '%s' version %d answered its %d warm-up sample(s)",
                name,
                spec.version,
                len(config.model_warmup),
            )
        kind = f"backend {config.backend}" if config.backend else "pipeline"
        log.info("model '%s' version %d is READY (%s)", name, spec.version, kind)
        return VersionState(spec, READY, "", executor)

    def _step_configs(self, spec: VersionSpec) -> dict[int, ModelConfig]:
        """The config of the model version each pipeline step calls (the checks and words
        `serverctl validate` uses); ValueError naming the step when one cannot be called."""
        assert spec.config is not None
        return step_configs(spec.config, self._step_model)

    def _step_model(self, name: str) -> StepModel:
        """What a pipeline step may call of a model: its ready versions' configs, and why the
        model is unavailable if it is; None for a model this server does not know."""
        state = self._models.get(name)
        if state is None:
            return None
        configs = {}
        for number in state.ready_versions():
            executor = state.versions[number].executor
            assert executor is not None
            configs[number] = executor.config
        return configs, state.error

    async def _recheck_pipelines(self, changed: str) -> None:
        """Reloads each pipeline that calls `changed` when whether it can run, or the config
        it completes to, is no longer what its state says."""
        for name, spec in list(self._specs.items()):
            if changed not in spec.step_models():
                continue
            if self._pipeline_current(name, spec):
                continue
            log.info("model '%s' changed: re-checking pipeline '%s'", changed, name)
            await self._load(spec, keep_serving=False)

    def _pipeline_current(self, name: str, spec: ModelSpec) -> bool:
        state = self._models.get(name)
        if state is None:
            return False
        for v in spec.versions:
            if v.config is None:
                continue
            try:
                completed = complete_pipeline(v.config, self._step_configs(v))
            except ValueError:
                completed = None
            found = state.versions.get(v.version)
            serving = found.executor.config if found and found.executor else None
            if completed != serving:
                return False
        return True

    async def _retire_all(self, name: str, reason: str) -> None:
        state = self._models.get(name)
        if state is None:
            return
        if reason == "unloaded":  # an unloaded pipeline is not loaded again by a re-check
            self._specs.pop(name, None)
            self._routers.pop(name, None)
        serving = [s.executor for s in state.versions.values() if s.executor is not None]
        unloading = {
            v: VersionState(s.spec, UNLOADING, reason) if s.state == READY else s
            for v, s in state.versions.items()
        }
        self._publish(ModelState(name, state.error, unloading))
        await self._stop(serving)
        self._publish(
            ModelState(
                name,
                state.error,
                {
                    v: VersionState(
                        s.spec, UNAVAILABLE, reason if s.state == UNLOADING else s.reason
                    )
                    for v, s in unloading.items()
                },
            )
        )
        for number, s in state.versions.items():
            if s.state == READY:
                self._notify(UNLOADED, ModelKey(name, number))
        log.info("model '%s' is UNAVAILABLE: %s", name, reason)

    def _publish(self, state: ModelState) -> None:
        """Makes `state` the model's state: one assignment, so traffic moves at once."""
        self._models[state.name] = state

    async def _stop(self, executors: list[Executor]) -> None:
        """Retired executors finish what they queued, then unload."""
        await asyncio.gather(*(e.stop() for e in executors), return_exceptions=True)

    def _notify(self, event: str, key: ModelKey) -> None:
        for subscriber in self._subscribers:
            try:
                subscriber(event, key)
            except Exception:  # a subscriber's bug must not undo a model change
                log.exception("a registry subscriber failed on %s %s", event, key)


def _weights_text(weights: dict[int, int]) -> str:
    return ", ".join(f"version {v}: {w}" for v, w in sorted(weights.items()))
