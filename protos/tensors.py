"""Tensor bytes on the wire: the raw little-endian form and the typed `contents` form.

BYTES tensors travel as the concatenation, per element, of a 4-byte little-endian
length and the element's bytes (what tritonclient's serialize_byte_tensor writes).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .datatypes import Datatype

_LENGTH = struct.Struct("<I")
BYTES_LENGTH_SIZE = _LENGTH.size  # every BYTES element starts with its length
_FIELD_DTYPES = {
    "bool_contents": np.bool_,
    "int_contents": np.int32,
    "int64_contents": np.int64,
    "uint_contents": np.uint32,
    "uint64_contents": np.uint64,
    "fp32_contents": np.float32,
    "fp64_contents": np.float64,
}


class TensorDataError(ValueError):
    """Tensor bytes that cannot be decoded as the declared datatype and shape."""


def element_count(shape: Iterable[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def serialize_bytes(array: np.ndarray) -> bytes:
    """Length-prefixed form of a BYTES tensor; str elements are UTF-8 encoded."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def deserialize_bytes(buffer: bytes | memoryview, count: int) -> np.ndarray:
    """Parses `count` length-prefixed elements; TensorDataError if the buffer disagrees."""
    view = memoryview(buffer)
    if count * BYTES_LENGTH_SIZE > len(view):  # checked before allocating for `count`
        raise TensorDataError(
            f"the shape claims {count} BYTES elements, which need at least "
            f"{count * BYTES_LENGTH_SIZE} bytes, but the data has {len(view)}"
        )
    items = np.empty(count, dtype=np.object_)
    offset = 0
    for i in range(count):
        if offset + 4 > len(view):
            raise TensorDataError(
                f"BYTES data ends after {i} of {count} elements (each needs a 4-byte length)"
            )
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise TensorDataError(
                f"BYTES element {i} claims {length} bytes but only {len(view) - offset} remain"
            )
        items[i] = bytes(view[offset : offset + length])
        offset += length
    if offset != len(view):
        raise TensorDataError(
            f"BYTES data has {len(view) - offset} bytes left over after {count} elements"
        )
    return items


def from_raw(raw: bytes | memoryview, dtype: Datatype, shape: Sequence[int]) -> np.ndarray:
    """A numpy view over raw tensor bytes (no copy), or a parsed object array for BYTES.

    The caller has checked the byte size of fixed-size datatypes.
    """
    if dtype.name == "BYTES":
        return deserialize_bytes(raw, element_count(shape)).reshape(shape)
    return np.frombuffer(raw, dtype=dtype.numpy).reshape(shape)


def from_contents(contents: Any, dtype: Datatype, shape: Sequence[int]) -> np.ndarray:
    """Converts typed InferTensorContents into an array, checking the field and element count."""
    field = dtype.contents_field
    if field is None:
        raise TensorDataError(
            f"datatype {dtype.name} has no typed contents field; send it in raw_input_contents"
        )
    used = [f.name for f, _ in contents.ListFields()]
    wrong = [name for name in used if name != field]
    if wrong:
        raise TensorDataError(
            f"typed contents for datatype {dtype.name} must use '{field}', not '{wrong[0]}'"
        )
    values = getattr(contents, field)
    expected = element_count(shape)
    if len(values) != expected:
        raise TensorDataError(
            f"expected {expected} elements in '{field}' for shape {list(shape)}, got {len(values)}"
        )
    if dtype.name == "BYTES":
        array = np.empty(expected, dtype=np.object_)
        array[:] = list(values)
        return array.reshape(shape)
    # Read with the field's own type (no detour through float64 for large 64-bit values);
    # narrower integers arrive widened to int32/uint32: keep their low bytes, as Triton does.
    wide: np.ndarray = np.asarray(values, dtype=_FIELD_DTYPES[field])
    return wide.astype(dtype.numpy, copy=False, casting="unsafe").reshape(shape)


def to_raw(array: np.ndarray, dtype: Datatype) -> bytes:
    """Raw wire bytes of an output tensor."""
    if dtype.name == "BYTES":
        return serialize_bytes(array)
    return np.ascontiguousarray(array, dtype=dtype.numpy).tobytes()
