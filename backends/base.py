"""The backend seam: how Tiffin loads a model file and runs whole batches on it.

A backend knows nothing of gRPC, queues or processes. The scheduler creates one
backend object per model instance (in a worker process or in the frontend),
calls `load` once, `infer_batch` once per batch (by default it calls `infer`), and
`unload` at the end.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tiffin.protos.model_config import ModelConfig
from tiffin.protos.names import shown


@dataclass(frozen=True)
class Device:
    """Where an instance runs: the CPU, or one GPU by its id as the process sees it."""

    kind: Literal["cpu", "gpu"] = "cpu"
    id: int = 0

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"gpu:{self.id}"


class MissingDependency(RuntimeError):
    """A model needs something this environment lacks (a framework, a GPU build of one): not a
    fault of the model repository. The message says what is missing and how to get it."""


def reject_unknown_parameters(config: ModelConfig, known: tuple[str, ...], backend: str) -> None:
    """ValueError listing the config's parameters that `backend` does not read, so that a
    misspelt setting is never silently ignored."""
    unknown = sorted(set(config.parameters) - set(known))
    if unknown:
        raise ValueError(
            f"parameters {', '.join(unknown)} are unknown to the {backend} backend; "
            f"it reads {', '.join(known)}"
        )


@dataclass
class BatchResult:
    """What `Backend.infer_batch` returns: the batch's outputs, and the requests that failed.

    `outputs` holds an array per requested output with rows for every request of the
    batch (the rows of failed requests are ignored; when every request failed, it may be
    empty). `failed` maps a request's index within the batch to its error: an
    `InvalidInput` (`tiffin.protos.errors`) when the request is at fault (INVALID_ARGUMENT),
    any other exception when the model failed on it (INTERNAL, naming the model).
    """

    outputs: dict[str, np.ndarray]
    failed: dict[int, Exception] = field(default_factory=dict)
    # Of the call's time, how long the backend spent moving the inputs onto its device and
    # the outputs off it (a GPU's host-device copies): told apart, they count as compute
    # input and output rather than infer, as Triton counts them. 0 where it cannot tell.
    input_ns: int = 0
    output_ns: int = 0


class BackendBase:
    """What every backend shares: its name, its model file, and completing a config."""

    #: Registered name, used as `backend:` in config.yaml.
    name: str = ""
    #: Files a version folder may hold the model in, in order of preference, unless the
    #: config names one (`default_model_filename`); empty for backends that need no file.
    model_filenames: tuple[str, ...] = ()
    #: Whether `kind: auto` may run instances inside the server process on a machine without
    #: a GPU, when the hand-off to a worker process costs more than it buys. Only for
    #: frameworks that run no user code and release the GIL while they compute; user code
    #: (the python backend, custom backends) always gets a process of its own.
    may_run_inline: bool = False

    @classmethod
    def model_path(cls, config: ModelConfig, version_dir: Path) -> Path:
        """The model file of a version folder: the config's `default_model_filename`, else the
        first of `model_filenames` present (else the first, to name in "not found"); the
        folder itself for backends that need no file.

        Raises ValueError when `default_model_filename` is not a plain file name (a path such
        as `../x` or `/etc/x` would reach outside the version folder)."""
        if config.default_model_filename:
            filename = config.default_model_filename
            if filename in (".", "..") or any(c in filename for c in "/\\\0"):
                raise ValueError(
                    f"default_model_filename: '{shown(filename)}' must be the name of a file "
                    "inside the version folder, not a path"
                )
            return version_dir / filename
        for filename in cls.model_filenames:
            if (version_dir / filename).exists():
                return version_dir / filename
        return version_dir / cls.model_filenames[0] if cls.model_filenames else version_dir

    @classmethod
    def complete_config(cls, config: ModelConfig, model_path: Path) -> ModelConfig:
        """Returns `config` with what the model file tells filled in (inputs, outputs,
        max_batch_size), checking what the config declares against the file.

        Raises ValueError with a sentence naming the field when they disagree, and
        MissingDependency when this environment lacks what reading the file needs.
        """
        return config

    @classmethod
    def check_devices(cls, config: ModelConfig, devices: Sequence[Device]) -> None:
        """Raises MissingDependency when this environment cannot run the model's instances on
        `devices` (a GPU instance with a CPU-only framework), as `load` would find, without
        loading anything. By default every device will do."""


class Backend(BackendBase, ABC):
    """One model instance of one framework.

    Lifecycle as in Triton's python backend (initialize / execute / finalize):
    `load(config, version_dir, device)`, then `infer_batch(inputs, outputs, rows)` per
    batch, which calls `infer(inputs, outputs)` unless overridden, then `unload()`.

    A request fails alone: override `infer_batch` to report the requests of a batch that
    failed (one error per request, as Triton's python backend answers), and only those fail;
    the batch runs once. An exception raised for the whole batch makes the scheduler run its
    requests again one at a time, so that only the bad ones fail: the fallback, which
    repeats the work and any side effects of the requests that were fine.
    """

    @abstractmethod
    def load(self, config: ModelConfig, version_dir: Path, device: Device) -> None:
        """Loads the model of one version folder onto `device`."""

    @abstractmethod
    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        """Runs one batch.

        `inputs` maps every provided input name to an array whose first dimension
        is the batch when the model batches. `outputs` names the outputs to
        return. Returns an array per requested output.
        """

    def infer_batch(
        self, inputs: dict[str, np.ndarray], outputs: list[str], rows: list[int]
    ) -> BatchResult:
        """Runs one batch of requests, reporting those that failed.

        `inputs` and `outputs` are as for `infer`; `rows` holds the number of rows of each
        request of the batch, in order (1 each when the model does not batch), so that
        request `i` owns rows `sum(rows[:i])` to `sum(rows[:i + 1])` of every input.
        The default calls `infer` and reports no failures.
        """
        return BatchResult(self.infer(inputs, outputs))

    def unload(self) -> None:  # noqa: B027 - optional hook; most backends let GC free memory
        """Releases what `load` acquired. Called once; the object is not used again."""


class ForwardingBackend(BackendBase, ABC):
    """A backend that hands each whole request to something else (a remote server) and
    awaits the answer: async, in the frontend process on the scheduler's event loop, with
    no worker process and no batching (the remote batches).

    `load` and `unload` run on the event loop; `infer` is called once per request, many
    at a time. Errors it raises that are `tiffin.protos.errors.TiffinError`s reach the
    caller with their own status; any other exception fails the request as INTERNAL.
    """

    @abstractmethod
    async def load(self, config: ModelConfig, version_dir: Path) -> None:
        """Prepares forwarding (connections) for one model version."""

    @abstractmethod
    async def infer(
        self,
        inputs: dict[str, np.ndarray],
        outputs: list[str],
        parameters: dict[str, Any],
        timeout: float | None,
    ) -> dict[str, np.ndarray]:
        """Forwards one request: its inputs, the outputs it asked for, its parameters, and
        the seconds left before its caller stops waiting (None: no deadline)."""

    async def unload(self) -> None:  # noqa: B027 - optional hook
        """Releases what `load` acquired, once requests in flight have finished."""
