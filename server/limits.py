"""How large a request may be: bounded by what the models it can name accept.

Both front doors use these bounds: gRPC as its transport's receive limit and per model
(grpc/decoder.py), REST as its body limit, so that a server of fixed-size models is never
made to receive more than its largest model can take.
"""

from __future__ import annotations

from collections.abc import Iterable

from tiffin.protos import MAX_MESSAGE_BYTES
from tiffin.protos.datatypes import DATATYPES
from tiffin.protos.model_config import ModelConfig
from tiffin.protos.tensors import element_count

from .registry import ModelState

# Room for what is not tensor data in a ModelInferRequest: names, id, parameters, shapes.
REQUEST_OVERHEAD_BYTES = 64 << 10
# Requests without tensor data (metadata, repository calls): gRPC's own default limit.
PLAIN_REQUEST_MAX_BYTES = 4 << 20


# Bytes one element may take in typed `contents`: integers are varints (up to 10 bytes).
_TYPED_ELEMENT_BYTES = {
    "int_contents": 10,
    "int64_contents": 10,
    "uint_contents": 10,
    "uint64_contents": 10,
    "bool_contents": 1,
    "fp32_contents": 4,
    "fp64_contents": 8,
}


def max_request_bytes(config: ModelConfig) -> int | None:
    """The largest ModelInferRequest the model can accept: its largest batch of every input,
    raw or typed, plus room for names and parameters; None when an input has a variable
    dimension or is BYTES, so that no fixed bound exists."""
    rows = config.max_batch_size if config.batching and config.max_batch_size else 1
    total = REQUEST_OVERHEAD_BYTES
    for tensor in config.inputs:
        dtype = DATATYPES[tensor.datatype]
        if dtype.itemsize == 0 or -1 in tensor.dims:
            return None
        per_element = max(dtype.itemsize, _TYPED_ELEMENT_BYTES.get(dtype.contents_field or "", 0))
        total += rows * element_count(tensor.dims) * per_element
    return total


def message_limit(configs: Iterable[ModelConfig]) -> int:
    """The largest request message the server must receive (the transport's limit): what
    the largest of these models can accept, at least PLAIN_REQUEST_MAX_BYTES for the other
    calls, and MAX_MESSAGE_BYTES when a model has no fixed bound. A pipeline without
    declared inputs is bounded by its steps' models, when they are among `configs`."""
    configs = list(configs)
    by_name = {c.name: c for c in configs}
    largest = PLAIN_REQUEST_MAX_BYTES
    for config in configs:
        if config.pipeline is not None and not config.inputs:
            steps = [by_name.get(step.model) for step in config.pipeline.steps]
            if None in steps:
                return MAX_MESSAGE_BYTES
            sizes = [max_request_bytes(c) for c in steps if c is not None]
        else:
            sizes = [max_request_bytes(config)]
        for size in sizes:
            if size is None:
                return MAX_MESSAGE_BYTES
            largest = max(largest, size)
    return largest


def request_limits(models: Iterable[ModelState]) -> dict[str, int | None]:
    """Each serving model's largest request: what the largest of its ready versions accepts
    (None when one has no fixed bound). Models with no ready version are left out."""
    limits: dict[str, int | None] = {}
    for model in models:
        configs = [model.versions[v].spec.config for v in model.ready_versions()]
        sizes = [max_request_bytes(c) for c in configs if c is not None]
        if sizes:
            fixed = [size for size in sizes if size is not None]
            limits[model.name] = max(fixed) if len(fixed) == len(sizes) else None
    return limits
