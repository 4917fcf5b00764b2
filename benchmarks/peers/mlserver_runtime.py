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

INPUT, OUTPUT = "INPUT0", "OUTPUT0"


class OnnxRuntimeModel(MLModel):
    """One ONNX model (parameters.uri), one intra-op thread, spinning off."""

    async def load(self) -> bool:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        uri = await get_model_uri(self.settings)
        self._session: Any = ort.InferenceSession(uri, options, providers=["CPUExecutionProvider"])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        """Runs the (possibly merged) batch; the output keeps the batch dimension first."""
        x = NumpyCodec.decode_input(payload.inputs[0])
        (y,) = self._session.run([OUTPUT], {INPUT: x})
        return InferenceResponse(
            model_name=self.name, outputs=[NumpyCodec.encode_output(OUTPUT, y)]
        )
