"""numpy dicts <-> ModelInferRequest / ModelInferResponse, for the clients."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tiffin.protos import protocol
from tiffin.protos.datatypes import datatype, from_numpy
from tiffin.protos.tensors import from_raw, to_raw


def build_request(
    model: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str] | None,
    version: str,
    request_id: str,
    parameters: Mapping[str, Any] | None,
) -> Any:
    """A ModelInferRequest with every input as raw little-endian bytes."""
    pb = protocol()
    msg = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, value in inputs.items():
        array = np.asarray(value)
        dtype = from_numpy(array.dtype)
        msg.inputs.add(name=name, datatype=dtype.name, shape=array.shape)
        msg.raw_input_contents.append(to_raw(array, dtype))
    for name in outputs or ():
        msg.outputs.add(name=name)
    for key, value in (parameters or {}).items():
        param = msg.parameters[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            param.int64_param = value
        elif isinstance(value, float):
            param.double_param = value
        elif isinstance(value, str):
            param.string_param = value
        else:
            raise TypeError(
                f"parameter '{key}' must be bool, int, float or str, not {type(value).__name__}"
            )
    return msg


def read_response(msg: Any) -> dict[str, np.ndarray]:
    """Output name -> array (read-only views over the response bytes, BYTES as object arrays)."""
    result = {}
    for i, out in enumerate(msg.outputs):
        raw = msg.raw_output_contents[i] if i < len(msg.raw_output_contents) else b""
        result[out.name] = from_raw(raw, datatype(out.datatype), list(out.shape))
    return result
