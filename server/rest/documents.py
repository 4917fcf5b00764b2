"""The JSON documents REST answers with, other than inference: as Triton writes them.

Metadata and the repository index are plain objects and lists; statistics follow
Triton's core (numbers, every duration present); the model config is the protobuf JSON
of Triton's `ModelConfig` with every field printed and 64-bit integers as numbers, which
is what Triton's own REST answers and what perf_analyzer reads.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor, json_format

from tiffin.protos.model_config import ModelConfig
from tiffin.scheduler import ModelKey
from tiffin.scheduler.statistics import DURATIONS, Duration, ModelStatistics

from ..dataplane import IndexEntry, ModelMetadata, ServerMetadata, TensorMetadata
from ..grpc.config_message import config_message

_INT64_TYPES = (
    descriptor.FieldDescriptor.CPPTYPE_INT64,
    descriptor.FieldDescriptor.CPPTYPE_UINT64,
)


def server_metadata(metadata: ServerMetadata) -> dict[str, Any]:
    return {"name": metadata.name, "version": metadata.version, "extensions": metadata.extensions}


def _tensor(tensor: TensorMetadata) -> dict[str, Any]:
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}


def model_metadata(metadata: ModelMetadata) -> dict[str, Any]:
    return {
        "name": metadata.name,
        "versions": metadata.versions,
        "platform": metadata.platform,
        "inputs": [_tensor(t) for t in metadata.inputs],
        "outputs": [_tensor(t) for t in metadata.outputs],
    }


def repository_index(entries: list[IndexEntry]) -> list[dict[str, str]]:
    rows = []
    for entry in entries:
        row = {"name": entry.name, "state": entry.state}
        if entry.version:
            row["version"] = entry.version
        if entry.reason:
            row["reason"] = entry.reason
        rows.append(row)
    return rows


def model_config(config: ModelConfig) -> dict[str, Any]:
    message = config_message(config)
    document = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _int64s_as_numbers(message.DESCRIPTOR, document)


def _int64s_as_numbers(message: descriptor.Descriptor, document: dict[str, Any]) -> dict[str, Any]:
    """Protobuf's JSON writes 64-bit integers as strings; Triton (and perf_analyzer, which
    reads `max_queue_delay_microseconds` and dims as numbers) has them as numbers."""
    for field in message.fields:
        value = document.get(field.name)
        if value is None:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            for key, item in value.items():
                value[key] = _converted(value_field, item)
        elif field.label == descriptor.FieldDescriptor.LABEL_REPEATED:
            document[field.name] = [_converted(field, item) for item in value]
        else:
            document[field.name] = _converted(field, value)
    return document


def _converted(field: descriptor.FieldDescriptor, value: Any) -> Any:
    if field.cpp_type in _INT64_TYPES:
        return int(value)
    if field.message_type is not None and isinstance(value, dict):
        return _int64s_as_numbers(field.message_type, value)
    return value


def _duration(duration: Duration) -> dict[str, int]:
    return {"count": duration.count, "ns": duration.ns}


def statistics(stats: list[tuple[ModelKey, ModelStatistics]]) -> dict[str, Any]:
    zero = Duration()
    models = []
    for key, s in stats:
        inference = {name: _duration(getattr(s, name)) for name in DURATIONS}
        inference["cache_hit"] = inference["cache_miss"] = _duration(zero)
        models.append(
            {
                "name": key.name,
                "version": str(key.version),
                "last_inference": s.last_inference_ms,
                "inference_count": s.inference_count,
                "execution_count": s.execution_count,
                "inference_stats": inference,
                "response_stats": {},
                "batch_stats": [
                    {
                        "batch_size": size,
                        "compute_input": _duration(s.batches[size].compute_input),
                        "compute_infer": _duration(s.batches[size].compute_infer),
                        "compute_output": _duration(s.batches[size].compute_output),
                    }
                    for size in sorted(s.batches)
                ],
                "memory_usage": [],
            }
        )
    return {"model_stats": models}
