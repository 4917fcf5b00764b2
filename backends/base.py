"""The backend seam: how Tiffin loads a model file and runs whole batches on it.

A backend knows nothing of gRPC, queues or processes. The scheduler creates one
backend object per model instance (in a worker process or in the frontend),
calls `load` once, `infer` once per batch, and `unload` at the end.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from tiffin.protos.model_config import ModelConfig


@dataclass(frozen=True)
class Device:
    """Where an instance runs: the CPU, or one GPU by its id as the process sees it."""

    kind: Literal["cpu", "gpu"] = "cpu"
    id: int = 0

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"gpu:{self.id}"


class Backend(ABC):
    """One model instance of one framework.

    Lifecycle as in Triton's python backend (initialize / execute / finalize):
    `load(config, version_dir, device)`, then `infer(inputs, outputs)` per batch,
    then `unload()`. Errors raised by `infer` fail only the batch being run.
    """

    #: Registered name, used as `backend:` in config.yaml.
    name: str = ""
    #: File inside a version folder that holds the model, unless the config names another;
    #: empty for backends that need no file (they get the version folder).
    default_model_filename: str = ""

    @classmethod
    def complete_config(cls, config: ModelConfig, model_path: Path) -> ModelConfig:
        """Returns `config` with what the model file tells filled in (inputs, outputs,
        max_batch_size), checking what the config declares against the file.

        Raises ValueError with a sentence naming the field when they disagree.
        """
        return config

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

    def unload(self) -> None:  # noqa: B027 - optional hook; most backends let GC free memory
        """Releases what `load` acquired. Called once; the object is not used again."""
