"""The BentoML peer: one service with a batchable API per model.

`bentoml serve bentoml_service:Models` (with this folder as the working directory, from
`benchmarks/.peers-venv-bentoml`) imports this module; the repository and the model names come
from TIFFIN_PEER_REPOSITORY and TIFFIN_PEER_MODELS. Each model gets `POST /<model>` taking
`{"x": [[...one item...]]}` (BentoML's JSON for an ndarray argument, the batch dimension
first) and answering the output as JSON; BentoML's adaptive batching (max_batch_size 32)
merges concurrent requests before the call. onnxruntime: one intra-op thread, spinning off.
It imports only bentoml, onnxruntime and numpy, never Tiffin.
"""

# No `from __future__ import annotations`: BentoML reads the API's annotations as objects.

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from onnx_session import INPUT, OUTPUT, load_session

MAX_BATCH_SIZE = 32


def _api(name: str) -> Callable[..., Any]:
    def infer(self, x: np.ndarray) -> np.ndarray:
        (y,) = self.sessions[name].run([OUTPUT], {INPUT: x.astype(np.float32, copy=False)})
        return y

    infer.__name__ = name
    return bentoml.api(infer, route=f"/{name}", batchable=True, max_batch_size=MAX_BATCH_SIZE)


def _init(self) -> None:
    repository = Path(os.environ["TIFFIN_PEER_REPOSITORY"])
    self.sessions = {name: load_session(repository / name / "1" / "model.onnx") for name in MODELS}


MODELS = [m for m in os.environ.get("TIFFIN_PEER_MODELS", "").split(",") if m]
# One worker process: the server has one core, as Tiffin and the other peers do. No access
# log line per request (the FastAPI peer has none either).
Models = bentoml.service(
    name="tiffin_bench_peer", workers=1, logging={"access": {"enabled": False}}
)(type("Models", (), {"__init__": _init, **{name: _api(name) for name in MODELS}}))
