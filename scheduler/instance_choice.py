"""`kind: auto` without a GPU: worker processes or inline, as timing the model at load decides.

A worker process keeps a framework's crash or leak away from the server, and costs a hand-off
per batch: the inputs copied into shared memory, a pipe message each way, and a process woken
each way. Where a batch computes for long, that cost is noise and the isolation is worth
keeping; for a small model it can cost as much as the model (on one core: mlp 0.5 ms per
batch-1 call, the hand-off about 0.2 ms). So the first such instance starts as a worker and
runs a batch-1 timing request a few times; the hand-off is the round trip less the backend's
own call, the least seen (a busy machine only adds to it). Where it costs `HAND_OFF_SHARE`
of that call or more, the model's measured instances run inline instead. Only backends that
may run inline (`may_run_inline`: no user code, compute without the GIL) are measured; the
rest stay workers.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tiffin.backends import Device
from tiffin.protos.datatypes import DATATYPES
from tiffin.protos.model_config import ModelConfig

from .instance import Instance
from .request import InferenceRequest, ModelKey

log = logging.getLogger(__name__)

# A worker is kept while its hand-off costs less than this share of the model's own call.
HAND_OFF_SHARE = 0.02
TIMED_RUNS = 15  # after a first run, which pays for first-call initialisation
TIMING_SECONDS = 3.0  # runs stop after this: a slow model is timed fewer times
# A first call that never returns would hold the load forever: it fails the load instead.
TIMING_LIMIT_SECONDS = 300.0
# The parameter saying how the instances were placed and why (ModelConfig shows it).
CHOICE_NOTE = "instance_choice"


@dataclass(frozen=True)
class InstanceChoice:
    """Whether the measured instances run inline, and the sentence saying why."""

    inline: bool
    reason: str


def decide(hand_off_ns: float, call_ns: float) -> InstanceChoice:
    """The choice for a worker whose hand-off took `hand_off_ns` a batch, beside the
    backend's own call of `call_ns`."""
    share = hand_off_ns / call_ns if call_ns > 0 else float("inf")
    figures = (
        f"the hand-off to a worker process took {hand_off_ns / 1e6:.3f} ms a batch, "
        f"{share:.0%} of the model's own {call_ns / 1e6:.3f} ms (batch 1, timed at load)"
    )
    if share >= HAND_OFF_SHARE:
        return InstanceChoice(
            True, f"inline: {figures}; a worker is kept while that is under {HAND_OFF_SHARE:.0%}"
        )
    return InstanceChoice(False, f"worker processes: {figures}, which their isolation is worth")


def timing_request(key: ModelKey, config: ModelConfig) -> InferenceRequest:
    """A batch-1 request of zeros (variable dims as 1, BYTES as empty strings) for every input
    the model needs."""
    inputs = {}
    for tensor in config.inputs:
        if tensor.optional:
            continue
        dims = [1 if d < 0 else d for d in tensor.dims]
        shape = [1, *dims] if config.batching else dims
        dtype = DATATYPES[tensor.datatype]
        if tensor.datatype == "BYTES":
            inputs[tensor.name] = np.full(shape, b"", dtype=object)
        else:
            inputs[tensor.name] = np.zeros(shape, dtype=dtype.numpy)
    return InferenceRequest(
        model=key,
        inputs=inputs,
        outputs=[t.name for t in config.outputs],
        id="instance-choice",
        config=config,
    )


async def _timed(worker: Instance, request: InferenceRequest) -> tuple[int, int]:
    """One run of `request` on `worker`: (hand-off, backend call) in nanoseconds."""
    begin = time.perf_counter_ns()
    execution = await worker.execute([request], request.outputs)
    round_trip = time.perf_counter_ns() - begin
    return max(round_trip - execution.infer_ns, 0), execution.infer_ns


async def time_worker(worker: Instance, request: InferenceRequest) -> tuple[float, float]:
    """(hand-off, backend call) in nanoseconds for `request` on `worker`: the least
    hand-off seen over the timed runs (waiting for a busy core only ever adds to it, so the
    least is the cost itself) and the median call. Runs stop after `TIMING_SECONDS`; a model
    whose first call takes longer is judged by that call alone (a hand-off is noise beside
    it). Raises what the worker raises."""
    deadline = time.monotonic() + TIMING_SECONDS
    first = await _timed(worker, request)  # first calls initialise lazily
    runs: list[tuple[int, int]] = []
    while len(runs) < TIMED_RUNS and time.monotonic() < deadline:
        runs.append(await _timed(worker, request))
    if not runs:
        return first
    return min(h for h, _ in runs), statistics.median(c for _, c in runs)


class InstanceChooser:
    """Settles a model version's measured instances: the first, started as a worker, is
    timed; then the others start as workers too, or all are replaced by inline instances.

    `names` are the measured instances' names, in order; `make_inline(name, device)` makes
    the inline instance that replaces one."""

    def __init__(
        self,
        key: ModelKey,
        config: ModelConfig,
        names: list[str],
        make_inline: Callable[[str, Device], Instance],
    ) -> None:
        self.key = key
        self.config = config
        self.names = names
        self._make_inline = make_inline

    def loaded_later(self, instance: Instance) -> bool:
        """Whether `instance` waits for the choice before it loads (all measured but the
        first)."""
        return instance.name in self.names[1:]

    async def settle(self, instances: list[Instance]) -> tuple[list[Instance], InstanceChoice]:
        """The instances to serve with, loaded, and the choice. The first measured instance
        is loaded already; those loaded here are unloaded again if one fails to load."""
        measured = next(i for i in instances if i.name == self.names[0])
        try:
            async with asyncio.timeout(TIMING_LIMIT_SECONDS):
                timed = await time_worker(measured, timing_request(self.key, self.config))
            choice = decide(*timed)
        except TimeoutError:  # the worker is still busy with it: this load cannot go on
            raise RuntimeError(
                f"a batch-1 request of zeros did not finish within {TIMING_LIMIT_SECONDS:g} s "
                "while kind auto timed the model; give the model's instance_group a kind "
                "(cpu or inline) to skip the timing"
            ) from None
        except Exception as exc:  # the model may refuse zeros: keep the safe choice
            message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            choice = InstanceChoice(False, f"worker processes: timing a batch failed ({message})")
        log.info("model '%s' version %d: kind auto runs %s", *self._where(), choice.reason)
        if choice.inline:
            await measured.unload()  # first, so that the model is never loaded twice
            settled = [
                self._make_inline(i.name, i.device) if i.name in self.names else i
                for i in instances
            ]
            fresh = [i for i in settled if i.name in self.names]
        else:
            settled = instances
            fresh = [i for i in instances if self.loaded_later(i)]
        results = await asyncio.gather(*(i.load() for i in fresh), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await asyncio.gather(*(i.unload() for i in fresh), return_exceptions=True)
            raise failures[0]
        return settled, choice

    def _where(self) -> tuple[str, int]:
        return self.key.name, self.key.version


def with_choice(config: ModelConfig, choice: InstanceChoice) -> ModelConfig:
    """`config` with the choice said in its parameters, as ModelConfig shows it."""
    return config.model_copy(
        update={"parameters": {**config.parameters, CHOICE_NOTE: choice.reason}}
    )
