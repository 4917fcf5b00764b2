"""ModelInferRequest -> WireRequest, and the scheduler's response -> ModelInferResponse.

Only what is particular to protobuf is judged here (typed `contents` mixed with
`raw_input_contents`, more raw entries than inputs); everything checked against a model's
config is validation.py's. Inputs stay views over `raw_input_contents` without copies.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tiffin.protos import protocol
from tiffin.protos.datatypes import DATATYPES, Datatype
from tiffin.protos.errors import InvalidInput
from tiffin.protos.model_config import ModelConfig
from tiffin.protos.names import shown
from tiffin.protos.tensors import from_contents, to_raw
from tiffin.scheduler import InferenceResponse

from ..validation import WireOutput, WireRequest, WireTensor


def parameter_value(param: Any) -> Any:
    """The Python value of an InferParameter (whichever oneof member is set)."""
    member = param.WhichOneof("parameter_choice")
    return getattr(param, member) if member else None


def parameters(params: Any) -> dict[str, Any]:
    return {key: parameter_value(param) for key, param in params.items()}


class Contents:
    """Typed `InferTensorContents`, decoded only once validation asks for it."""

    __slots__ = ("_contents",)

    def __init__(self, contents: Any) -> None:
        self._contents = contents

    def array(self, dtype: Datatype, shape: list[int]) -> np.ndarray:
        return from_contents(self._contents, dtype, shape)


def wire_request(msg: Any) -> WireRequest:
    """The request as received; InvalidInput when its raw and typed data do not pair up."""
    raw = msg.raw_input_contents
    inputs = [
        WireTensor(
            t.name,
            t.datatype,
            list(t.shape),
            None,
            parameters(t.parameters) if t.parameters else {},
        )
        for t in msg.inputs
    ]
    if raw:
        typed = [t.name for t in msg.inputs if t.HasField("contents")]
        if typed:
            raise InvalidInput(
                f"contents field must not be specified when using raw_input_contents "
                f"for '{shown(typed[0])}' for model '{shown(msg.model_name)}': send every "
                "input either raw or typed"
            )
        if len(raw) > len(inputs):
            raise InvalidInput(
                f"the request for model '{shown(msg.model_name)}' has {len(raw)} "
                f"raw_input_contents entries but only {len(inputs)} inputs use them"
            )
        for tensor, data in zip(inputs, raw, strict=False):
            tensor.data = data  # inputs beyond the raw entries have no data: validation says so
    else:
        for tensor, message in zip(inputs, msg.inputs, strict=True):
            if message.HasField("contents"):
                tensor.data = Contents(message.contents)
    outputs = [
        WireOutput(o.name, parameters(o.parameters) if o.parameters else {}) for o in msg.outputs
    ]
    return WireRequest(
        model_name=msg.model_name,
        model_version=msg.model_version,
        inputs=inputs,
        outputs=outputs,
        id=msg.id,
        parameters=parameters(msg.parameters) if msg.parameters else {},
    )


def encode_response(response: InferenceResponse, config: ModelConfig, final: bool = False) -> Any:
    """A ModelInferResponse: one outputs[i] and one raw_output_contents[i] per output, paired."""
    pb = protocol()
    msg = pb.ModelInferResponse(
        model_name=response.model.name,
        model_version=str(response.model.version),
        id=response.id,
    )
    if final:
        msg.parameters["triton_final_response"].bool_param = True
    declared = {t.name: t.datatype for t in config.outputs}
    for name, array in response.outputs.items():
        dtype = DATATYPES[declared[name]]
        out = msg.outputs.add()
        out.name = name
        out.datatype = dtype.name
        out.shape.extend(array.shape)
        msg.raw_output_contents.append(to_raw(array, dtype))
    return msg
