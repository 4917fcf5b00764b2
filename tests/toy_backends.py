"""Toy backends for tests, named in config.yaml by import path (`toy_backends:Echo`).

They run in real worker processes, which import this module: tests put tests/ on
PYTHONPATH for the servers they start.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np

from tiffin.backends import Backend, BatchResult, Device
from tiffin.protos.errors import InvalidInput
from tiffin.protos.model_config import ModelConfig


class _Toy(Backend):
    def load(self, config: ModelConfig, version_dir: Path, device: Device) -> None:
        self.config = config
        self.device = device
        self.version_dir = version_dir

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        return {"OUTPUT0": inputs["INPUT0"].copy()}


class Echo(_Toy):
    """OUTPUT0 = INPUT0."""


class Env(_Toy):
    """OUTPUT0 = INPUT0; ENV = [CUDA_VISIBLE_DEVICES, device the backend was given, pid]."""

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        rows = inputs["INPUT0"].shape[0]
        facts = [
            os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"),
            str(self.device),
            str(os.getpid()),
        ]
        return {
            "OUTPUT0": inputs["INPUT0"].copy(),
            "ENV": np.array([[f.encode() for f in facts]] * rows, dtype=np.object_),
        }


class Slow(_Toy):
    """OUTPUT0 = INPUT0 after sleeping INPUT0[0, 0] seconds (once per batch)."""

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        time.sleep(float(inputs["INPUT0"].reshape(-1)[0]))
        return super().infer(inputs, outputs)


class Gate(_Toy):
    """OUTPUT0 = INPUT0. Appends the values of every batch it is given to `batches.log` in its
    version folder, one line a batch, before anything else (a test sees the batch start); a
    batch holding the value HOLD then waits until the version folder has a file named
    `release`, at most LIMIT_SECONDS (a test that never releases it fails, not hangs)."""

    HOLD = 1000.0
    LIMIT_SECONDS = 60.0

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        values = inputs["INPUT0"].reshape(-1)
        with open(self.version_dir / "batches.log", "a") as log:
            log.write(" ".join(f"{v:g}" for v in values) + "\n")
        if (values == self.HOLD).any():
            release = self.version_dir / "release"
            deadline = time.monotonic() + self.LIMIT_SECONDS
            while not release.exists():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{release} did not appear within {self.LIMIT_SECONDS} s")
                time.sleep(0.005)
        return super().infer(inputs, outputs)


class Fail(_Toy):
    """Raises when any element of INPUT0 is negative; otherwise OUTPUT0 = INPUT0. Appends
    the rows of every batch it is given to `calls.log` in its version folder."""

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        with open(self.version_dir / "calls.log", "a") as log:
            log.write(f"{len(inputs['INPUT0'])}\n")
        if (inputs["INPUT0"] < 0).any():
            raise ValueError("negative input is not allowed")
        return super().infer(inputs, outputs)


class Canary(_Toy):
    """OUTPUT0 = INPUT0, but in version folder 2 a batch holding a negative value raises (a
    canary that fails for the requests that carry one), and values above 100 come back
    doubled (a candidate that answers differently)."""

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        values = inputs["INPUT0"]
        if self.version_dir.name == "2":
            if (values < 0).any():
                raise RuntimeError("the canary fails on negative input")
            return {"OUTPUT0": np.where(values > 100, values * 2, values)}
        return super().infer(inputs, outputs)


class FailSome(_Toy):
    """OUTPUT0 = INPUT0, with per-request failures through `infer_batch`: a request holding a
    negative value fails with InvalidInput (its fault), one holding a value above 1000 with
    RuntimeError (the model's). Appends the rows of every batch it is given to `calls.log` in
    its version folder; returns no outputs when every request of a batch failed."""

    def infer_batch(
        self, inputs: dict[str, np.ndarray], outputs: list[str], rows: list[int]
    ) -> BatchResult:
        values = inputs["INPUT0"]
        with open(self.version_dir / "calls.log", "a") as log:
            log.write(f"{len(values)}\n")
        failed: dict[int, Exception] = {}
        start = 0
        for index, count in enumerate(rows):
            own = values[start : start + count]
            start += count
            if (own < 0).any():
                failed[index] = InvalidInput(f"INPUT0 holds a negative value, {own.min()}")
            elif (own > 1000).any():
                failed[index] = RuntimeError(f"INPUT0 holds {own.max()}, above 1000")
        if len(failed) == len(rows):
            return BatchResult({}, failed)
        return BatchResult({"OUTPUT0": values.copy()}, failed)


class Crash(_Toy):
    """Kills its own process when INPUT0 holds 666; otherwise OUTPUT0 = INPUT0."""

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        if (inputs["INPUT0"] == 666).any():
            os.kill(os.getpid(), signal.SIGKILL)
        return super().infer(inputs, outputs)


class CrashNoRestart(Crash):
    """Crash, whose load fails once the version folder holds a file named `refuse-load`
    (a test creates it after the first load, so the worker cannot start again)."""

    def load(self, config: ModelConfig, version_dir: Path, device: Device) -> None:
        if (version_dir / "refuse-load").exists():
            raise RuntimeError("refuse-load marker present")
        super().load(config, version_dir, device)


class SlowLoad(_Toy):
    """OUTPUT0 = INPUT0, after a load that sleeps `parameters.load_seconds` (default 2)."""

    def load(self, config: ModelConfig, version_dir: Path, device: Device) -> None:
        time.sleep(float(config.parameters.get("load_seconds", 2)))
        super().load(config, version_dir, device)
