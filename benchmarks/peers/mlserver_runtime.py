"""The MLServer peer's custom runtime: onnxruntime behind MLServer's `MLModel`.

Imported by MLServer (from `benchmarks/.peers-venv`) as `mlserver_runtime.OnnxRuntimeModel`,
with this folder on PYTHONPATH; it imports only mlserver, onnxruntime and numpy, never Tiffin.
MLServer's adaptive batching (model-settings.json: max_batch_size, max_batch_time) merges
requests along the first dimension before `predict` and splits the answer after it.
"""

from __future__ import annotations

from typing import Any

from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri
from onnx_session import INPUT, OUTPUT, load_session


class OnnxRuntimeModel(MLModel):
    """One ONNX model (parameters.uri), one intra-op thread, spinning off."""

    async def load(self) -> bool:
        self._session: Any = load_session(await get_model_uri(self.settings))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        """Runs the (possibly merged) batch; the output keeps the batch dimension first."""
        x = NumpyCodec.decode_input(payload.inputs[0])
        (y,) = self._session.run([OUTPUT], {INPUT: x})
        return InferenceResponse(
            model_name=self.name, outputs=[NumpyCodec.encode_output(OUTPUT, y)]
        )
