"""The one place where an inference request is checked against its model's config.

Front doors turn what they received (a ModelInferRequest, a REST body) into a
`WireRequest` without judging it; `validate` makes every check that Triton makes before
a request reaches a model, with Triton's wording, and decodes the tensors. Everything
the request claims (names, datatypes, shapes, batch size) is checked first; only then is
data decoded, each tensor's size checked against the bytes actually sent before anything
is allocated for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from tiffin.protos.datatypes import DATATYPES, Datatype
from tiffin.protos.errors import InvalidInput, ModelNotFound
from tiffin.protos.model_config import ModelConfig, TensorConfig, shape_fits, shape_text
from tiffin.protos.names import shown
from tiffin.protos.tensors import TensorDataError, element_count, from_raw
from tiffin.scheduler import InferenceRequest, ModelKey
from tiffin.scheduler.context import RequestContext


class TypedValues(Protocol):
    """Tensor data sent as typed values (gRPC `contents`, REST JSON `data`)."""

    def array(self, dtype: Datatype, shape: list[int]) -> np.ndarray:
        """The values as an array of `dtype` and `shape`; TensorDataError if they disagree."""


@dataclass(slots=True)
class WireTensor:
    """An input as the request names it; `data` is raw bytes, typed values, or None."""

    name: str
    datatype: str
    shape: list[int]
    data: bytes | memoryview | TypedValues | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class WireOutput:
    """An output the request asks for, with its parameters."""

    name: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class WireRequest:
    """An inference request as a front door received it, before any check."""

    model_name: str
    model_version: str
    inputs: list[WireTensor]
    outputs: list[WireOutput] = field(default_factory=list)
    id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)


# Request parameters Triton interprets, with the Python types each may have.
_RESERVED_TYPES: dict[str, tuple[type, ...]] = {
    "sequence_id": (int, str),
    "sequence_start": (bool,),
    "sequence_end": (bool,),
    "priority": (int,),
    "timeout": (int,),
    "triton_enable_empty_final_response": (bool,),
}
_TYPE_NAMES = {int: "an integer", str: "a string", bool: "a boolean"}
# The integers each may hold: Triton takes a timeout only as int64, the others as either.
_RESERVED_RANGES = {
    "timeout": range(-(2**63), 2**63),
    "priority": range(-(2**63), 2**64),
    "sequence_id": range(-(2**63), 2**64),
}
SHARED_MEMORY_KEYS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


def _check_parameters(parameters: dict[str, Any], model: str) -> None:
    for key, value in parameters.items():
        allowed = _RESERVED_TYPES.get(key)
        if allowed is not None:
            # bool is an int in Python, but not a valid priority or timeout.
            if type(value) not in allowed:
                expected = " or ".join(_TYPE_NAMES[t] for t in allowed)
                raise InvalidInput(
                    f"invalid value type for '{key}' parameter, expected {expected}."
                )
            valid = _RESERVED_RANGES.get(key)
            if valid is not None and type(value) is int and value not in valid:
                raise InvalidInput(
                    f"invalid value for '{key}' parameter: {value} is out of range "
                    f"[{valid.start}, {valid.stop - 1}]"
                )
        elif key.startswith("triton_"):
            raise InvalidInput(
                f"parameter keys starting with 'triton_' are reserved for Triton usage and "
                f"should not be specified: '{shown(key)}' (model '{model}')"
            )


def _check_shared_memory(parameters: dict[str, Any]) -> None:
    if any(k in parameters for k in SHARED_MEMORY_KEYS):
        region = parameters.get("shared_memory_region", "")
        raise ModelNotFound(f"Unable to find shared memory region: '{shown(str(region))}'")


def _check_shape(tensor: TensorConfig, shape: list[int], config: ModelConfig, model: str) -> None:
    expected = tensor.full_dims(config.batching)
    if not shape_fits(shape, expected):
        raise InvalidInput(
            f"unexpected shape for input '{tensor.name}' for model '{model}'. "
            f"Expected {shape_text(expected)}, got {shape_text(shape)}"
        )


def validate(
    request: WireRequest,
    key: ModelKey,
    config: ModelConfig,
    context: RequestContext,
    max_elements: int = 0,
) -> InferenceRequest:
    """Checks a request against the model's config (and, unless 0, its tensors' elements
    all together against `max_elements`) and decodes its tensors."""
    model = key.name
    context.version = str(key.version)
    _check_parameters(request.parameters, model)
    declared = {t.name: t for t in config.inputs}
    claims: list[tuple[WireTensor, TensorConfig]] = []
    seen: set[str] = set()
    batch_size: int | None = None
    for tensor in request.inputs:
        name = tensor.name
        spec = declared.get(name)
        if spec is None:
            raise InvalidInput(
                f"unexpected inference input '{shown(name)}' for model '{model}'; it expects "
                f"{', '.join(declared) or 'no inputs'}"
            )
        if name in seen:
            raise InvalidInput(f"input '{name}' is given twice in the request for model '{model}'")
        seen.add(name)
        if tensor.datatype != spec.datatype:
            raise InvalidInput(
                f"inference input '{name}' data-type is '{shown(tensor.datatype)}', but model "
                f"'{model}' expects '{spec.datatype}'"
            )
        _check_shape(spec, tensor.shape, config, model)
        if config.batching:
            if batch_size is None:
                batch_size = tensor.shape[0]
            elif tensor.shape[0] != batch_size:
                raise InvalidInput(
                    f"input '{name}' has batch size {tensor.shape[0]} but an earlier input of "
                    f"the same request has {batch_size} for model '{model}'; all inputs must agree"
                )
        _check_shared_memory(tensor.parameters)
        claims.append((tensor, spec))

    missing = [t.name for t in config.inputs if t.name not in seen and not t.optional]
    if missing:
        raise InvalidInput(
            f"expected {len(config.inputs)} inputs but got {len(seen)} inputs for model "
            f"'{model}'. Got input(s) {sorted(seen)}, but missing required input(s) {missing}. "
            "Please provide all required input(s)."
        )
    if config.batching:
        assert config.max_batch_size is not None and batch_size is not None
        if batch_size > config.max_batch_size:
            raise InvalidInput(
                f"inference request batch-size must be <= {config.max_batch_size} for '{model}'"
            )
        if batch_size < 1:
            raise InvalidInput(f"inference request batch-size must be >= 1 for '{model}'")
    if max_elements:
        elements = sum(math.prod(tensor.shape) for tensor, _ in claims)
        if elements > max_elements:
            raise InvalidInput(
                f"the request for model '{model}' holds {elements} tensor elements, more than "
                f"this server takes in one request ({max_elements}, --max-request-elements)"
            )
    outputs = _requested_outputs(request.outputs, config, model)

    inputs = {}
    for tensor, spec in claims:
        name = spec.name
        dtype = DATATYPES[spec.datatype]
        data = tensor.data
        try:
            if data is None:
                raise InvalidInput(
                    f"unable to find data for input tensor '{name}' for model '{model}' in request."
                )
            if isinstance(data, bytes | memoryview):
                _check_byte_size(name, model, dtype, tensor.shape, len(data))
                inputs[name] = from_raw(data, dtype, tensor.shape)
            else:
                inputs[name] = data.array(dtype, tensor.shape)
        except TensorDataError as exc:
            raise InvalidInput(f"input '{name}' for model '{model}': {exc}") from None

    context.id = request.id
    return InferenceRequest(
        model=key,
        inputs=inputs,
        outputs=outputs,
        id=request.id,
        parameters=request.parameters,
        batch_size=batch_size if config.batching and batch_size is not None else 1,
        deadline=context.deadline,
        timeline=context.timeline,
        config=config,
        pinned=bool(request.model_version),
    )


def _check_byte_size(name: str, model: str, dtype: Datatype, shape: list[int], size: int) -> None:
    """The bytes sent must be what the shape claims (BYTES: checked while parsing, before
    anything is allocated for the elements)."""
    if dtype.itemsize == 0:
        return
    expected = element_count(shape) * dtype.itemsize
    if size != expected:
        raise InvalidInput(
            f"input byte size mismatch for input '{name}' for model '{model}'. "
            f"Expected {expected}, got {size}"
        )


def _requested_outputs(wanted: list[WireOutput], config: ModelConfig, model: str) -> list[str]:
    known = [t.name for t in config.outputs]
    if not wanted:
        return known
    names: list[str] = []
    for out in wanted:
        if out.name not in known:
            raise InvalidInput(
                f"unexpected inference output '{shown(out.name)}' for model '{model}'; it has "
                f"{', '.join(known)}"
            )
        if out.name in names:
            raise InvalidInput(f"output '{out.name}' is requested twice for model '{model}'")
        _check_shared_memory(out.parameters)
        if "classification" in out.parameters:
            raise InvalidInput(
                f"output '{out.name}' asks for classification, which this server does not "
                "offer yet; request the tensor and take the top classes on the client"
            )
        names.append(out.name)
    return names
