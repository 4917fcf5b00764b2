"""How a tensor crosses between the frontend and a worker: a small header plus arena bytes.

Only headers are pickled. Tensor bytes sit in the instance's shared-memory arena; a
tensor that does not fit, and BYTES outputs, travel inline in the header instead
(the defined slower path).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from tiffin.protos.datatypes import DATATYPES, from_numpy
from tiffin.protos.tensors import element_count, from_raw, serialize_bytes

from .arena import Arena, align


class TensorRef(NamedTuple):
    """Where a tensor is: `offset` into the arena (with `nbytes`), or `inline` bytes."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    inline: bytes | None = None


def view(arena: Arena, ref: TensorRef) -> np.ndarray:
    """The tensor as an array: a view over the arena, or decoded from inline bytes."""
    dtype = DATATYPES[ref.datatype]
    if ref.inline is not None:
        return from_raw(ref.inline, dtype, ref.shape)
    if dtype.name == "BYTES":
        return from_raw(arena.buffer[ref.offset : ref.offset + ref.nbytes], dtype, ref.shape)
    count = element_count(ref.shape)
    return np.frombuffer(arena.buffer, dtype.numpy, count, ref.offset).reshape(ref.shape)


def write(arena: Arena, name: str, array: np.ndarray, offset: int) -> tuple[TensorRef, int]:
    """Places one array at `offset` (or inline if it does not fit); returns its ref and the
    next free offset."""
    dtype = from_numpy(array.dtype)
    shape = tuple(array.shape)
    if dtype.name == "BYTES":
        data = serialize_bytes(array)
        return TensorRef(name, "BYTES", shape, -1, len(data), data), offset
    nbytes = array.size * dtype.itemsize
    if offset + nbytes > arena.size:
        return TensorRef(name, dtype.name, shape, -1, nbytes, array.tobytes()), offset
    target = np.frombuffer(arena.buffer, dtype.numpy, array.size, offset).reshape(shape)
    target[...] = array
    return TensorRef(name, dtype.name, shape, offset, nbytes), align(offset + nbytes)


def write_inputs(arena: Arena, batches: dict[str, list[np.ndarray]]) -> tuple[list[TensorRef], int]:
    """Copies each input's per-request arrays straight into consecutive rows of one arena
    tensor (no intermediate concatenation). Returns the refs and the first free offset."""
    refs = []
    offset = 0
    for name, arrays in batches.items():
        first = arrays[0]
        dtype = from_numpy(first.dtype)
        rows = sum(a.shape[0] for a in arrays) if len(arrays) > 1 else None
        shape = (rows, *first.shape[1:]) if rows is not None else tuple(first.shape)
        if dtype.name == "BYTES":
            data = b"".join(serialize_bytes(a) for a in arrays)
            if offset + len(data) <= arena.size:
                arena.buffer[offset : offset + len(data)] = data
                refs.append(TensorRef(name, "BYTES", shape, offset, len(data)))
                offset = align(offset + len(data))
            else:
                refs.append(TensorRef(name, "BYTES", shape, -1, len(data), data))
            continue
        nbytes = element_count(shape) * dtype.itemsize
        if offset + nbytes > arena.size:  # too big for the arena: inline
            data = (np.concatenate(arrays) if len(arrays) > 1 else first).tobytes()
            refs.append(TensorRef(name, dtype.name, shape, -1, nbytes, data))
            continue
        target = np.frombuffer(arena.buffer, dtype.numpy, element_count(shape), offset)
        target = target.reshape(shape)
        row = 0
        for array in arrays:
            count = array.shape[0] if rows is not None else 1
            if rows is None:
                target[...] = array
            else:
                target[row : row + count] = array
            row += count
        refs.append(TensorRef(name, dtype.name, shape, offset, nbytes))
        offset = align(offset + nbytes)
    return refs, offset
