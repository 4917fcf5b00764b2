"""ModelInferRequest <-> the scheduler's request: decoding, validation and encoding.

Inputs become numpy views over `raw_input_contents` without copies. Every check that
Triton makes before a request reaches a model is made here, with Triton's wording,
so that bad input never reaches a backend.
"""

from __future__ import annotations

import time
from typing import Any

from tiffin.protos import protocol
from tiffin.protos.datatypes import DATATYPES, Datatype
from tiffin.protos.errors import InvalidInput, ModelNotFound
from tiffin.protos.model_config import ModelConfig, TensorConfig
from tiffin.protos.names import shown
from tiffin.protos.tensors import TensorDataError, element_count, from_contents, from_raw, to_raw
from tiffin.scheduler import InferenceRequest, InferenceResponse, ModelKey

# Request parameters Triton interprets, with the InferParameter member each must use.
_RESERVED_TYPES: dict[str, tuple[str, ...]] = {
    "sequence_id": ("int64_param", "string_param", "uint64_param"),
    "sequence_start": ("bool_param",),
    "sequence_end": ("bool_param",),
    "priority": ("uint64_param", "int64_param"),
    "timeout": ("int64_param",),
    "triton_enable_empty_final_response": ("bool_param",),
}
_SHM_KEYS = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


def parameter_value(param: Any) -> Any:
    """The Python value of an InferParameter (whichever oneof member is set)."""
    member = param.WhichOneof("parameter_choice")
    return getattr(param, member) if member else None


def _decode_parameters(msg: Any, model: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, param in msg.parameters.items():
        member = param.WhichOneof("parameter_choice")
        if key in _RESERVED_TYPES:
            if member not in _RESERVED_TYPES[key]:
                expected = " or ".join(_RESERVED_TYPES[key])
                raise InvalidInput(
                    f"invalid value type for '{key}' parameter, expected {expected}."
                )
        elif key.startswith("triton_"):
            raise InvalidInput(
                f"parameter keys starting with 'triton_' are reserved for Triton usage and "
                f"should not be specified: '{shown(key)}' (model '{model}')"
            )
        values[key] = parameter_value(param)
    return values


def _shape_text(shape: list[int]) -> str:
    return "[" + ",".join(map(str, shape)) + "]"


def _check_shape(tensor: TensorConfig, shape: list[int], config: ModelConfig, model: str) -> None:
    expected = ([-1] if config.batching else []) + list(tensor.dims)
    fits = len(shape) == len(expected) and all(
        d >= 0 and (e == -1 or d == e) for d, e in zip(shape, expected, strict=True)
    )
    if not fits:
        raise InvalidInput(
            f"unexpected shape for input '{tensor.name}' for model '{model}'. "
            f"Expected {_shape_text(expected)}, got {_shape_text(shape)}"
        )


def decode_request(
    msg: Any, key: ModelKey, config: ModelConfig, deadline: float | None = None
) -> InferenceRequest:
    """Validates a ModelInferRequest against the model's config and decodes its tensors.

    Everything the request claims (names, datatypes, shapes, batch size, how many
    raw entries) is checked against the config first; only then is data decoded, each
    tensor's size checked against the bytes actually sent before anything is allocated
    for it.
    """
    model = key.name
    parameters = _decode_parameters(msg, model)
    declared = {t.name: t for t in config.inputs}
    claims: list[tuple[Any, TensorConfig, list[int]]] = []
    seen: set[str] = set()
    batch_size: int | None = None
    for tensor in msg.inputs:
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
        shape = list(tensor.shape)
        _check_shape(spec, shape, config, model)
        if config.batching:
            if batch_size is None:
                batch_size = shape[0]
            elif shape[0] != batch_size:
                raise InvalidInput(
                    f"input '{name}' has batch size {shape[0]} but an earlier input of the "
                    f"same request has {batch_size} for model '{model}'; all inputs must agree"
                )
        if any(k in tensor.parameters for k in _SHM_KEYS):
            region = tensor.parameters.get("shared_memory_region")
            region_name = parameter_value(region) if region is not None else ""
            raise ModelNotFound(f"Unable to find shared memory region: '{shown(str(region_name))}'")
        claims.append((tensor, spec, shape))

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
    raw = msg.raw_input_contents
    raw_count = len(raw)
    if raw_count:
        typed = [t.name for t, _, _ in claims if t.HasField("contents")]
        if typed:
            raise InvalidInput(
                f"contents field must not be specified when using raw_input_contents "
                f"for '{typed[0]}' for model '{model}': send every input either raw or typed"
            )
        if raw_count < len(claims):
            raise InvalidInput(
                f"unable to find data for input tensor '{claims[raw_count][1].name}' for model "
                f"'{model}' in request."
            )
        if raw_count > len(claims):
            raise InvalidInput(
                f"the request for model '{model}' has {raw_count} raw_input_contents entries "
                f"but only {len(claims)} inputs use them"
            )

    inputs = {}
    for index, (tensor, spec, shape) in enumerate(claims):
        name = spec.name
        dtype = DATATYPES[spec.datatype]
        try:
            if not raw_count:
                if not tensor.HasField("contents"):
                    raise InvalidInput(
                        f"unable to find data for input tensor '{name}' for model '{model}' "
                        "in request."
                    )
                inputs[name] = from_contents(tensor.contents, dtype, shape)
                continue
            data = raw[index]
            _check_byte_size(name, model, dtype, shape, len(data))
            inputs[name] = from_raw(data, dtype, shape)
        except TensorDataError as exc:
            raise InvalidInput(f"input '{name}' for model '{model}': {exc}") from None

    return InferenceRequest(
        model=key,
        inputs=inputs,
        outputs=_requested_outputs(msg, config, model),
        id=msg.id,
        parameters=parameters,
        batch_size=batch_size if config.batching and batch_size is not None else 1,
        deadline=deadline,
        arrival_ns=time.monotonic_ns(),
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


def _requested_outputs(msg: Any, config: ModelConfig, model: str) -> list[str]:
    known = [t.name for t in config.outputs]
    if not msg.outputs:
        return known
    names: list[str] = []
    for out in msg.outputs:
        if out.name not in known:
            raise InvalidInput(
                f"unexpected inference output '{shown(out.name)}' for model '{model}'; it has "
                f"{', '.join(known)}"
            )
        if out.name in names:
            raise InvalidInput(f"output '{out.name}' is requested twice for model '{model}'")
        if any(k in out.parameters for k in _SHM_KEYS):
            region = out.parameters.get("shared_memory_region")
            region_name = parameter_value(region) if region is not None else ""
            raise ModelNotFound(f"Unable to find shared memory region: '{shown(str(region_name))}'")
        if "classification" in out.parameters:
            raise InvalidInput(
                f"output '{out.name}' asks for classification, which this server does not "
                "offer yet; request the tensor and take the top classes on the client"
            )
        names.append(out.name)
    return names


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
