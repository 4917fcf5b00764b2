"""The model manager: which model versions exist, their states, and which one serves a call."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from tiffin.protos.errors import InvalidInput, ModelNotFound, ModelNotReady, UnknownModel
from tiffin.protos.model_config import ModelConfig
from tiffin.protos.names import name_problem, parse_version, shown
from tiffin.scheduler import ModelKey, Scheduler

from .pipelines import complete_pipeline
from .repository import ModelSpec, VersionSpec, read_model, read_repository

log = logging.getLogger(__name__)

READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"


@dataclass(frozen=True)
class VersionState:
    """A version's lifecycle state, with the reason when it is not READY."""

    spec: VersionSpec
    state: str
    reason: str = ""


@dataclass(frozen=True)
class ModelState:
    """A model as the manager knows it; replaced whole on every change (read from any thread)."""

    name: str
    error: str  # why the model as a whole is unavailable, if it is
    versions: dict[int, VersionState]

    def ready_versions(self) -> list[int]:
        return sorted(v for v, s in self.versions.items() if s.state == READY)


def _step_models(spec: ModelSpec) -> set[str]:
    """The models a pipeline's steps call (empty for other models)."""
    return {
        step.model
        for v in spec.versions
        if v.config and v.config.pipeline
        for step in v.config.pipeline.steps
    }


class ModelManager:
    """Owns the repository's models and their states.

    Loading and unloading run on the scheduler's event loop; lookups (`resolve`,
    `models`) are called from gRPC threads and read immutable snapshots.

    `allowed_backends` lists the backends by import path that configs may name (`module:Class`
    or `module`); None reads TIFFIN_ALLOWED_BACKENDS each time the repository is read.
    """

    def __init__(
        self,
        repository: Path,
        scheduler: Scheduler,
        allowed_backends: Sequence[str] | None = None,
    ) -> None:
        self.repository = repository
        self._scheduler = scheduler
        self._allowed_backends = allowed_backends
        self._models: dict[str, ModelState] = {}

    def read_all(self) -> list[ModelSpec]:
        """Reads every model folder of the repository (nothing is loaded)."""
        return read_repository(self.repository, self._allowed_backends)

    async def load_all(self, specs: list[ModelSpec] | None = None) -> None:
        """Loads every model of the repository (as `read_all` read it, or reads it now),
        several at once; pipelines after the models their steps call."""
        if specs is None:
            specs = await asyncio.to_thread(self.read_all)
        pending = {s.name: s for s in specs if _step_models(s)}
        await asyncio.gather(*(self._load(s) for s in specs if s.name not in pending))
        while pending:
            ready = [s for s in pending.values() if not (_step_models(s) & pending.keys())]
            # A cycle of pipelines: load them anyway, each then reports its missing steps.
            batch = ready or list(pending.values())
            for spec in batch:
                del pending[spec.name]
            await asyncio.gather(*(self._load(s) for s in batch))

    async def load(self, name: str) -> None:
        """(Re)reads one model folder and loads it; the old versions go after the new are up.

        `name` comes from a client: it is checked as a model name (one path component)
        before it touches the disk, so only a folder of the repository is ever read.
        InvalidInput when the name is not a model name, has no folder, or fails to load.
        """
        problem = name_problem(name)
        if problem:
            raise InvalidInput(f"failed to load: {problem}")
        path = self.repository / name
        if not path.is_dir():
            raise InvalidInput(f"failed to load '{name}': no model folder {path}")
        spec = await asyncio.to_thread(read_model, path, self._allowed_backends)
        await self._load(spec)
        state = self._models[spec.name]
        if state.error or not state.ready_versions():
            reasons = [state.error] + [s.reason for s in state.versions.values() if s.reason]
            raise InvalidInput(f"failed to load '{name}': " + "; ".join(r for r in reasons if r))

    async def unload(self, name: str) -> None:
        """Unloads every version of a model; it stays known, as UNAVAILABLE. InvalidInput
        when `name` is not a model name or not a model this server knows."""
        problem = name_problem(name)
        if problem:
            raise InvalidInput(f"failed to unload: {problem}")
        state = self._models.get(name)
        if state is None:
            raise UnknownModel(f"Request for unknown model: '{shown(name)}' is not found")
        await self._retire(state, reason="unloaded")

    async def unload_all(self) -> None:
        await asyncio.gather(
            *(self._retire(s, "server shutting down") for s in list(self._models.values()))
        )

    def models(self) -> list[ModelState]:
        return [self._models[n] for n in sorted(self._models)]

    def all_ready(self) -> bool:
        return all(
            not s.error and s.versions and all(v.state == READY for v in s.versions.values())
            for s in self._models.values()
        )

    def resolve(self, name: str, version: str) -> VersionSpec:
        """The version that should serve a call, with Triton's errors when there is none."""
        state = self._models.get(name)
        if state is None:
            raise UnknownModel(f"Request for unknown model: '{shown(name)}' is not found")
        if version == "":
            ready = state.ready_versions()
            if not ready:
                raise ModelNotFound(
                    f"Request for unknown model: '{name}' has no available versions"
                )
            return state.versions[ready[-1]].spec
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
        return found.spec

    def state(self, name: str) -> ModelState:
        state = self._models.get(name)
        if state is None:
            raise UnknownModel(f"Request for unknown model: '{shown(name)}' is not found")
        return state

    async def _load(self, spec: ModelSpec) -> None:
        old = self._models.get(spec.name)
        if spec.error:
            log.error("model '%s' is UNAVAILABLE: %s", spec.name, spec.error)
            self._models[spec.name] = ModelState(spec.name, spec.error, {})
        else:
            versions = {
                v.version: VersionState(v, LOADING if v.config else UNAVAILABLE, v.error)
                for v in spec.versions
            }
            self._models[spec.name] = ModelState(spec.name, "", versions)
            results = await asyncio.gather(
                *(self._load_version(spec.name, v) for v in spec.versions if v.config)
            )
            for version_state in results:
                versions[version_state.spec.version] = version_state
            for v in spec.versions:
                if v.error:
                    log.error(
                        "model '%s' version %d is UNAVAILABLE: %s", spec.name, v.version, v.error
                    )
            self._models[spec.name] = ModelState(spec.name, "", dict(versions))
        if old is not None:  # versions the new read no longer selects go away
            current = self._models[spec.name].versions
            for number, s in old.versions.items():
                if s.state == READY and (number not in current or current[number].state != READY):
                    await self._scheduler.unload(ModelKey(spec.name, number))

    async def _load_version(self, name: str, spec: VersionSpec) -> VersionState:
        config = spec.config
        assert config is not None
        key = ModelKey(name, spec.version)
        try:
            if config.pipeline is not None:
                config = complete_pipeline(config, self._step_configs(spec))
                spec = replace(spec, config=config)
            await self._scheduler.load(key, config, spec.path)
        except Exception as exc:  # any failure to load makes only this version unavailable
            reason = f"failed to load: {exc}"
            log.error("model '%s' version %d is UNAVAILABLE: %s", name, spec.version, reason)
            return VersionState(spec, UNAVAILABLE, reason)
        kind = f"backend {config.backend}" if config.backend else "pipeline"
        log.info("model '%s' version %d is READY (%s)", name, spec.version, kind)
        return VersionState(spec, READY)

    def _step_configs(self, spec: VersionSpec) -> dict[int, ModelConfig]:
        """The config of the model version each pipeline step calls; ValueError if not ready."""
        assert spec.config is not None and spec.config.pipeline is not None
        configs = {}
        for i, step in enumerate(spec.config.pipeline.steps):
            state = self._models.get(step.model)
            ready = state.ready_versions() if state else []
            version = ready[-1] if step.version == -1 and ready else step.version
            if version not in ready:
                which = "no ready version" if step.version == -1 else f"no ready version {version}"
                raise ValueError(
                    f"step {i + 1} calls model '{step.model}', which has {which}"
                    + (f" ({state.error})" if state and state.error else "")
                )
            assert state is not None
            step_config = state.versions[version].spec.config
            assert step_config is not None
            configs[i] = step_config
        return configs

    async def _retire(self, state: ModelState, reason: str) -> None:
        unloading = {
            v: VersionState(s.spec, UNLOADING, reason) if s.state == READY else s
            for v, s in state.versions.items()
        }
        self._models[state.name] = ModelState(state.name, state.error, unloading)
        for number, s in unloading.items():
            if s.state == UNLOADING:
                await self._scheduler.unload(ModelKey(state.name, number))
        self._models[state.name] = ModelState(
            state.name,
            state.error,
            {
                v: VersionState(s.spec, UNAVAILABLE, reason if s.state == UNLOADING else s.reason)
                for v, s in unloading.items()
            },
        )
        log.info("model '%s' is UNAVAILABLE: %s", state.name, reason)
