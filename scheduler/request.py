"""The scheduler's request and response: numpy tensors plus what scheduling needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tiffin.protos.model_config import ModelConfig

from .context import Timeline


@dataclass(frozen=True)
class ModelKey:
    """A model version, the unit the scheduler serves."""

    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name} version {self.version}"


@dataclass
class InferenceRequest:
    """One decoded, validated request for one model version."""

    model: ModelKey
    inputs: dict[str, np.ndarray]
    outputs: list[str]  # requested outputs, resolved: never empty
    id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 1  # rows in the first dimension; 1 for models that do not batch
    deadline: float | None = None  # time.monotonic() after which the client no longer waits
    # When it reached each stage; shared with its RequestContext, stamped once per stage.
    timeline: Timeline = field(default_factory=Timeline)
    # The config it was validated against, and whether the caller named its version: a
    # request that did not may move to a newer version taking the same inputs (a swap).
    config: ModelConfig | None = None
    pinned: bool = True

    @property
    def arrival_ns(self) -> int:
        """When the request was received (time.monotonic_ns())."""
        return self.timeline.received


@dataclass
class InferenceResponse:
    """The outputs of one request, by name, in the order they were requested."""

    model: ModelKey
    outputs: dict[str, np.ndarray]
    id: str = ""
