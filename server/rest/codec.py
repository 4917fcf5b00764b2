"""A REST inference body -> WireRequest, and the scheduler's response -> a REST body.

The body is a JSON header, then (Triton's binary tensor extension) the raw bytes of each
input that says `binary_data_size`, in input order; `Inference-Header-Content-Length`
says where the header ends. Only what is particular to this wire is judged here (JSON
shapes and types, the binary sizes adding up to the rest of the body); everything checked
against a model's config is validation.py's. Binary inputs stay memoryviews into the
body, and JSON `data` becomes `JsonValues`, which counts elements against the shape
before it builds an array and walks nested lists without recursion.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from tiffin.protos.datatypes import DATATYPES, Datatype
from tiffin.protos.errors import InvalidInput
from tiffin.protos.model_config import ModelConfig
from tiffin.protos.names import shown
from tiffin.protos.tensors import TensorDataError, element_count, to_raw
from tiffin.scheduler import InferenceResponse

from ..validation import WireOutput, WireRequest, WireTensor

# Nested `data` lists deeper than this are refused (Triton: HTTP_MAX_JSON_NESTING_DEPTH).
MAX_DATA_DEPTH = 100
_MAX_DIM = 2**63 - 1
_JSON_SCALARS = (bool, int, float, str)


class JsonValues:
    """A tensor's JSON `data`: a flat or nested list, row-major, as Triton accepts it."""

    __slots__ = ("_data",)

    def __init__(self, data: list[Any]) -> None:
        self._data = data

    def array(self, dtype: Datatype, shape: list[int]) -> np.ndarray:
        if dtype.name in ("FP16", "BF16"):
            raise TensorDataError(
                f"{dtype.name} data cannot be sent as JSON; send it binary "
                "('binary_data_size' in the input's parameters)"
            )
        count = element_count(shape)
        flat = _flatten(self._data, count)
        if dtype.name == "BYTES":
            return _bytes_array(flat).reshape(shape)
        return _number_array(flat, dtype, count).reshape(shape)


def _flatten(data: list[Any], count: int) -> list[Any]:
    """The elements of `data` in row-major order; TensorDataError unless there are `count`.

    Walks with a stack, never recursing, and stops as soon as there are too many."""
    if len(data) == count and not any(type(x) is list for x in data[:1]):
        return data  # flat, as tritonclient sends it; a list inside shows up as ndim > 1
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if type(item) is list:
                if len(stack) >= MAX_DATA_DEPTH:
                    raise TensorDataError(f"'data' is nested more than {MAX_DATA_DEPTH} lists deep")
                stack.append(iter(item))
                break
            flat.append(item)
            if len(flat) > count:
                raise TensorDataError(f"'data' has more than the {count} elements its shape claims")
        else:
            stack.pop()
    if len(flat) != count:
        raise TensorDataError(f"'data' has {len(flat)} elements but its shape claims {count}")
    return flat


def _bytes_array(flat: list[Any]) -> np.ndarray:
    array = np.empty(len(flat), dtype=np.object_)
    for i, item in enumerate(flat):
        if type(item) is not str:
            raise TensorDataError(f"BYTES element {i} is not a JSON string")
        array[i] = item.encode("utf-8")
    return array


def _number_array(flat: list[Any], dtype: Datatype, count: int) -> np.ndarray:
    if count == 0:
        return np.empty(0, dtype=dtype.numpy)
    try:
        values = np.array(flat)
    except (ValueError, TypeError, OverflowError):
        values = np.array([], dtype=np.object_)  # ragged: refused below
    kind = dtype.numpy.kind
    allowed = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}[kind]
    if values.ndim != 1 or values.dtype.kind not in allowed:
        wanted = {"b": "true or false", "i": "integers", "u": "integers", "f": "numbers"}[kind]
        raise TensorDataError(f"{dtype.name} elements must be JSON {wanted}")
    if kind in "iu":
        info = np.iinfo(dtype.numpy)
        low, high = values.min(), values.max()
        if low < info.min or high > info.max:
            bad = low if low < info.min else high
            raise TensorDataError(f"{bad} is out of the range of {dtype.name}")
    return values.astype(dtype.numpy, copy=False)


# ---- the request ------------------------------------------------------------------------


def _field(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is not bool and type(value) is bool):
        raise InvalidInput(f"unable to parse '{key}' of {where}: it has the wrong JSON type")
    return value


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = _field(obj, "parameters", dict, where) or {}
    for key, value in params.items():
        if not isinstance(value, _JSON_SCALARS):
            raise InvalidInput(
                f"parameter '{shown(key)}' of {where} must be a string, number or boolean"
            )
    return params


def _shape(tensor: dict[str, Any], where: str) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d <= _MAX_DIM for d in shape):
        raise InvalidInput(f"unable to parse 'shape' of {where}: expected a list of dimensions")
    return shape


def json_object(text: bytes | bytearray, what: str) -> dict[str, Any]:
    """A request's JSON text as an object; InvalidInput naming `what` when it is not one
    (deep nesting included: json refuses it with RecursionError)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidInput(f"{what} is not valid JSON: {shown(str(exc), 200)}") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return value


def wire_request(
    body: bytes | bytearray | memoryview, header_length: int | None, model: str, version: str
) -> tuple[WireRequest, dict[str, bool], bool]:
    """Decodes an infer body: the request, the binary choice of each output the request
    names, and whether outputs are binary by default (`binary_data_output`).

    `header_length` is the Inference-Header-Content-Length (None: the body is all JSON)."""
    view = memoryview(body)
    end = len(view) if header_length is None else header_length
    if isinstance(body, memoryview) or end < len(view):
        text: bytes | bytearray = view[:end].tobytes()
    else:
        text = body  # all JSON: parsed where it lies
    where = f"the request for model '{shown(model)}'"
    header = json_object(text, where)
    inputs_json = header.get("inputs")
    if not isinstance(inputs_json, list) or not all(isinstance(t, dict) for t in inputs_json):
        raise InvalidInput(f"unable to parse 'inputs' of {where}: expected a list of objects")

    inputs: list[WireTensor] = []
    offset = end
    for position, tensor in enumerate(inputs_json):
        name = _field(tensor, "name", str, f"input {position} of {where}")
        if name is None:
            raise InvalidInput(f"input {position} of {where} has no 'name'")
        here = f"input '{shown(name)}' for model '{shown(model)}'"
        datatype = _field(tensor, "datatype", str, here) or ""
        shape = _shape(tensor, here)
        params = _parameters(tensor, here)
        size = params.pop("binary_data_size", None)
        data = tensor.get("data")
        if (size is None) == (data is None):
            raise InvalidInput(
                f"{here} must set exactly one of 'data' and 'binary_data_size' in "
                f"'parameters', but set {'both' if data is not None else 'neither'}"
            )
        wire = WireTensor(name, datatype, shape, None, params)
        if size is not None:
            if type(size) is not int or size < 0:
                raise InvalidInput(f"unable to parse 'binary_data_size' of {here}")
            if header_length is None:
                raise InvalidInput(
                    f"{here} is binary ('binary_data_size'), so the request needs an "
                    "Inference-Header-Content-Length header saying where its JSON ends"
                )
            if offset + size > len(view):
                raise InvalidInput(
                    f"unexpected size for {here}: 'binary_data_size' is {size} bytes but only "
                    f"{len(view) - offset} bytes of binary data remain in the request"
                )
            wire.data = view[offset : offset + size]
            offset += size
        elif isinstance(data, list):
            wire.data = JsonValues(data)
        else:
            raise InvalidInput(f"unable to parse 'data' of {here}: expected a JSON list")
        inputs.append(wire)
    if offset != len(view):
        raise InvalidInput(
            f"the request for model '{shown(model)}' has {len(view) - offset} bytes of binary "
            "data that no input's 'binary_data_size' accounts for"
        )

    outputs_json = header.get("outputs", [])
    if not isinstance(outputs_json, list) or not all(isinstance(o, dict) for o in outputs_json):
        raise InvalidInput(f"unable to parse 'outputs' of {where}: expected a list of objects")
    outputs: list[WireOutput] = []
    binary: dict[str, bool] = {}
    for position, output in enumerate(outputs_json):
        name = _field(output, "name", str, f"output {position} of {where}")
        if name is None:
            raise InvalidInput(f"output {position} of {where} has no 'name'")
        here = f"output '{shown(name)}' for model '{shown(model)}'"
        params = _parameters(output, here)
        choice = params.pop("binary_data", None)
        if choice is not None:
            if type(choice) is not bool:
                raise InvalidInput(f"unable to parse 'binary_data' of {here}: expected a boolean")
            binary[name] = choice
        outputs.append(WireOutput(name, params))

    params = _parameters(header, where)
    default_binary = params.pop("binary_data_output", False)
    if type(default_binary) is not bool:
        raise InvalidInput(f"unable to parse 'binary_data_output' of {where}: expected a boolean")
    request_id = _field(header, "id", str, where) or ""
    request = WireRequest(model, version, inputs, outputs, request_id, params)
    return request, binary, default_binary


# ---- the response -----------------------------------------------------------------------


def encode_response(
    response: InferenceResponse,
    config: ModelConfig,
    binary: dict[str, bool],
    default_binary: bool,
) -> tuple[bytes, list[bytes]]:
    """The response's JSON header and the binary parts that follow it, in output order."""
    declared = {t.name: t.datatype for t in config.outputs}
    outputs = []
    parts: list[bytes] = []
    for name, array in response.outputs.items():
        dtype = DATATYPES[declared[name]]
        entry: dict[str, Any] = {"name": name, "datatype": dtype.name, "shape": list(array.shape)}
        if binary.get(name, default_binary):
            raw = to_raw(array, dtype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            parts.append(raw)
        else:
            entry["data"] = _json_data(name, array, dtype)
        outputs.append(entry)
    document: dict[str, Any] = {
        "model_name": response.model.name,
        "model_version": str(response.model.version),
    }
    if response.id:
        document["id"] = response.id
    document["outputs"] = outputs
    return json.dumps(document, separators=(",", ":")).encode(), parts


def _json_data(name: str, array: np.ndarray, dtype: Datatype) -> list[Any]:
    flat = np.asarray(array).reshape(-1)
    if dtype.name == "BYTES":
        try:
            return [item.decode("utf-8") if isinstance(item, bytes) else str(item) for item in flat]
        except UnicodeDecodeError:
            raise InvalidInput(
                f"output '{name}' holds bytes that are not UTF-8 text, which JSON cannot "
                "carry; request it binary ('binary_data': true in its parameters)"
            ) from None
    if dtype.name == "BF16":
        raise InvalidInput(
            f"output '{name}' is BF16, which JSON cannot carry; request it binary "
            "('binary_data': true in its parameters)"
        )
    return flat.tolist()
