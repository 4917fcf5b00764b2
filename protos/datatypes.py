"""The protocol's tensor datatypes: wire names, numpy dtypes, sizes and config enum names."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Datatype:
    """One wire datatype (e.g. "FP32") and how it maps to numpy and the config enum."""

    name: str
    numpy: np.dtype
    itemsize: int  # bytes per element; 0 for BYTES, whose elements vary in length
    config_name: str  # the model_config.proto enum name, e.g. TYPE_FP32
    contents_field: str | None  # the typed InferTensorContents field, None if raw only


def _bf16() -> np.dtype:
    try:
        import ml_dtypes  # optional: numpy has no bfloat16 of its own

        return np.dtype(ml_dtypes.bfloat16)
    except ImportError:
        return np.dtype(np.uint16)  # carries the bits unchanged


DATATYPES: dict[str, Datatype] = {
    d.name: d
    for d in [
        Datatype("BOOL", np.dtype(np.bool_), 1, "TYPE_BOOL", "bool_contents"),
        Datatype("UINT8", np.dtype(np.uint8), 1, "TYPE_UINT8", "uint_contents"),
        Datatype("UINT16", np.dtype("<u2"), 2, "TYPE_UINT16", "uint_contents"),
        Datatype("UINT32", np.dtype("<u4"), 4, "TYPE_UINT32", "uint_contents"),
        Datatype("UINT64", np.dtype("<u8"), 8, "TYPE_UINT64", "uint64_contents"),
        Datatype("INT8", np.dtype(np.int8), 1, "TYPE_INT8", "int_contents"),
        Datatype("INT16", np.dtype("<i2"), 2, "TYPE_INT16", "int_contents"),
        Datatype("INT32", np.dtype("<i4"), 4, "TYPE_INT32", "int_contents"),
        Datatype("INT64", np.dtype("<i8"), 8, "TYPE_INT64", "int64_contents"),
        Datatype("FP16", np.dtype("<f2"), 2, "TYPE_FP16", None),
        Datatype("FP32", np.dtype("<f4"), 4, "TYPE_FP32", "fp32_contents"),
        Datatype("FP64", np.dtype("<f8"), 8, "TYPE_FP64", "fp64_contents"),
        Datatype("BF16", _bf16(), 2, "TYPE_BF16", None),
        Datatype("BYTES", np.dtype(np.object_), 0, "TYPE_STRING", "bytes_contents"),
    ]
}

_BY_CONFIG_NAME = {d.config_name: d for d in DATATYPES.values()}


def datatype(name: str) -> Datatype:
    """Looks up a wire name ("FP32") or config enum name ("TYPE_FP32"); KeyError if neither."""
    found = DATATYPES.get(name) or _BY_CONFIG_NAME.get(name)
    if found is None:
        raise KeyError(name)
    return found


def from_numpy(dtype: np.dtype) -> Datatype:
    """The wire datatype of a numpy dtype (str and bytes arrays are BYTES)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return DATATYPES["BYTES"]
    for d in DATATYPES.values():
        if d.name != "BYTES" and d.numpy == dtype.newbyteorder("<"):
            return d
    raise KeyError(f"numpy dtype {dtype} has no protocol datatype")
