"""Warm-up (Triton's `model_warmup`): the requests a version answers before it takes traffic.

A version's executor is started, then sent each sample `count` times, one after another, as
an ordinary request; only when every one is answered does the registry publish the version
READY. A sample that fails, or takes longer than `WARMUP_SECONDS`, makes the version
UNAVAILABLE with the sample's name and the reason, and a reload whose warm-up fails leaves
the old version serving. First calls pay for lazy initialisation (memory arenas, kernels
chosen on the first shapes seen, CUDA contexts); here warm-up pays it, not a client.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import numpy as np

from tiffin.protos.datatypes import DATATYPES
from tiffin.protos.model_config import ModelConfig, TensorConfig, WarmupInput, WarmupSample
from tiffin.protos.tensors import from_raw
from tiffin.scheduler import Executor, InferenceRequest, ModelKey
from tiffin.scheduler.context import Timeline

WARMUP_SECONDS = 300.0  # for one sample's every send; a slow first load of a GPU kernel fits
MAX_WARMUP_FILE_BYTES = 1 << 30


class WarmupFailed(Exception):
    """A warm-up sample that could not be built or was not answered; names the sample."""


def sample_request(
    key: ModelKey, config: ModelConfig, sample: WarmupSample, version_dir: Path
) -> InferenceRequest:
    """The request a sample stands for; WarmupFailed naming what does not fit the config."""
    where = f"warm-up sample '{sample.name}'"
    declared = {t.name: t for t in config.inputs}
    missing = [n for n, t in declared.items() if not t.optional and n not in sample.inputs]
    if missing:
        raise WarmupFailed(f"{where} gives no data for input '{missing[0]}'")
    inputs = {}
    for name, data in sample.inputs.items():
        tensor = declared.get(name)
        if tensor is None:
            raise WarmupFailed(f"{where} names '{name}', which is not an input of the model")
        inputs[name] = _array(tensor, data, sample, config, version_dir, where)
    return InferenceRequest(
        model=key,
        inputs=inputs,
        outputs=[t.name for t in config.outputs],
        id=f"warmup:{sample.name}",
        batch_size=sample.batch_size if config.batching else 1,
        config=config,
        pinned=True,
    )


def _array(
    tensor: TensorConfig,
    data: WarmupInput,
    sample: WarmupSample,
    config: ModelConfig,
    version_dir: Path,
    where: str,
) -> np.ndarray:
    dims = data.dims or tensor.dims
    if any(d < 0 for d in dims):
        raise WarmupFailed(f"{where}: input '{tensor.name}' has variable dims; give its dims")
    shape = [sample.batch_size, *dims] if config.batching else list(dims)
    dtype = DATATYPES[tensor.datatype]
    count = int(np.prod(shape))
    if data.input_data_file:
        # Triton keeps warm-up data in the model folder's warmup/; the name is a plain file
        # name (the config's check), and the file must lie inside that folder.
        folder = (version_dir.parent / "warmup").resolve()
        path = (folder / data.input_data_file).resolve()
        if path.parent != folder or not path.is_file():
            raise WarmupFailed(
                f"{where}: no file warmup/{data.input_data_file} in the model folder"
            )
        if path.stat().st_size > MAX_WARMUP_FILE_BYTES:
            raise WarmupFailed(f"{where}: warmup/{data.input_data_file} is larger than 1 GiB")
        raw = path.read_bytes()
        if dtype.itemsize and len(raw) != count * dtype.itemsize:
            raise WarmupFailed(
                f"{where}: warmup/{data.input_data_file} holds {len(raw)} bytes, but input "
                f"'{tensor.name}' of shape {shape} needs {count * dtype.itemsize}"
            )
        try:
            return from_raw(raw, dtype, shape)
        except Exception as exc:
            raise WarmupFailed(f"{where}: warmup/{data.input_data_file}: {exc}") from None
    if tensor.datatype == "BYTES":
        rng = np.random.default_rng(0)
        items = [b"" if data.zero_data else rng.bytes(8) for _ in range(count)]
        return np.array(items, dtype=object).reshape(shape)
    if data.zero_data:
        return np.zeros(shape, dtype=dtype.numpy)
    rng = np.random.default_rng(0)
    if dtype.numpy == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.issubdtype(dtype.numpy, np.integer):
        info = np.iinfo(dtype.numpy)
        return rng.integers(max(info.min, -100), min(info.max, 100), size=shape, dtype=dtype.numpy)
    return rng.random(shape).astype(dtype.numpy)


async def warm_up(
    executor: Executor, key: ModelKey, config: ModelConfig, version_dir: Path
) -> None:
    """Sends every sample of `config.model_warmup`; WarmupFailed at the first that fails."""
    for sample in config.model_warmup:
        request = sample_request(key, config, sample, version_dir)
        try:
            async with asyncio.timeout(WARMUP_SECONDS):
                for _ in range(sample.count):
                    await executor.enqueue(_fresh(request))
        except TimeoutError:
            raise WarmupFailed(
                f"warm-up sample '{sample.name}' was not answered within {WARMUP_SECONDS:g} s"
            ) from None
        except WarmupFailed:
            raise
        except Exception as exc:
            message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            raise WarmupFailed(f"warm-up sample '{sample.name}' failed: {message}") from None


def _fresh(request: InferenceRequest) -> InferenceRequest:
    """A copy with a timeline of its own: each send is a request."""
    return replace(request, timeline=Timeline())
