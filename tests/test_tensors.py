"""Tensor bytes on the wire (tiffin.protos.tensors) and the datatype table (datatypes)."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from tiffin.protos import protocol
from tiffin.protos.datatypes import DATATYPES, datatype, from_numpy
from tiffin.protos.tensors import (
    TensorDataError,
    deserialize_bytes,
    element_count,
    from_contents,
    from_raw,
    serialize_bytes,
    to_raw,
)

# Six values per datatype, including each type's extremes where it has them.
VALUES: dict[str, list] = {
    "BOOL": [True, False, True, True, False, False],
    "UINT8": [0, 1, 127, 128, 255, 7],
    "UINT16": [0, 1, 256, 65535, 0x1234, 9],
    "UINT32": [0, 1, 2**31, 2**32 - 1, 65536, 5],
    "UINT64": [0, 1, 2**63, 2**64 - 1, 2**32, 3],
    "INT8": [-128, -1, 0, 1, 127, 42],
    "INT16": [-32768, -1, 0, 1, 32767, 300],
    "INT32": [-(2**31), -1, 0, 1, 2**31 - 1, 70000],
    "INT64": [-(2**63), -1, 0, 1, 2**63 - 1, 2**40],
    "FP16": [-1.5, 0.0, 1.0, 65504.0, 0.25, -0.125],
    "FP32": [-1.5, 0.0, 1e-30, 3.4e38, 0.1, -7.25],
    "FP64": [-1.5, 0.0, 1e-300, 1.7e308, 0.1, -7.25],
    "BF16": [-1.5, 0.0, 1.0, 256.0, 0.5, -2.0],
}
FIXED = sorted(VALUES)
SHAPE = [2, 3]


def _array(name: str) -> np.ndarray:
    return np.array(VALUES[name], dtype=DATATYPES[name].numpy).reshape(SHAPE)


def _contents(**fields: list) -> object:
    message = protocol().InferTensorContents()
    for field, values in fields.items():
        getattr(message, field).extend(values)
    return message


def _low_bytes_signed(value: int, bits: int) -> int:
    low = value & ((1 << bits) - 1)
    return low - (1 << bits) if low >= 1 << (bits - 1) else low


# --- the datatype table (PROTOCOL.md 3.1) --------------------------------------------------

TABLE = [  # wire name, bytes per element, config enum, numpy dtype, typed contents field
    ("BOOL", 1, "TYPE_BOOL", np.bool_, "bool_contents"),
    ("UINT8", 1, "TYPE_UINT8", np.uint8, "uint_contents"),
    ("UINT16", 2, "TYPE_UINT16", np.uint16, "uint_contents"),
    ("UINT32", 4, "TYPE_UINT32", np.uint32, "uint_contents"),
    ("UINT64", 8, "TYPE_UINT64", np.uint64, "uint64_contents"),
    ("INT8", 1, "TYPE_INT8", np.int8, "int_contents"),
    ("INT16", 2, "TYPE_INT16", np.int16, "int_contents"),
    ("INT32", 4, "TYPE_INT32", np.int32, "int_contents"),
    ("INT64", 8, "TYPE_INT64", np.int64, "int64_contents"),
    ("FP16", 2, "TYPE_FP16", np.float16, None),
    ("FP32", 4, "TYPE_FP32", np.float32, "fp32_contents"),
    ("FP64", 8, "TYPE_FP64", np.float64, "fp64_contents"),
    ("BF16", 2, "TYPE_BF16", None, None),
    ("BYTES", 0, "TYPE_STRING", np.object_, "bytes_contents"),
]


def test_table_lists_every_datatype() -> None:
    assert sorted(row[0] for row in TABLE) == sorted(DATATYPES)
    assert FIXED == sorted(set(DATATYPES) - {"BYTES"})


@pytest.mark.parametrize(("name", "size", "config_name", "numpy_type", "field"), TABLE)
def test_datatype_table(
    name: str, size: int, config_name: str, numpy_type: type | None, field: str | None
) -> None:
    d = datatype(name)
    assert d.name == name
    assert d.itemsize == size
    assert d.config_name == config_name
    assert d.contents_field == field
    if numpy_type is not None:
        assert d.numpy == np.dtype(numpy_type)
    if size:
        assert d.numpy.itemsize == size


@pytest.mark.parametrize(
    ("wire", "config"),
    [("FP32", "TYPE_FP32"), ("BYTES", "TYPE_STRING"), ("BOOL", "TYPE_BOOL"), ("BF16", "TYPE_BF16")],
)
def test_datatype_accepts_wire_and_config_names(wire: str, config: str) -> None:
    assert datatype(wire) is datatype(config)
    assert datatype(config).name == wire


@pytest.mark.parametrize("name", ["FP33", "", "STRING", "TYPE_INVALID", "fp32", "Fp32"])
def test_datatype_unknown_raises_key_error(name: str) -> None:
    # Wire datatype strings are upper-case and matched exactly (PROTOCOL.md 3.1).
    with pytest.raises(KeyError):
        datatype(name)


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (np.float32, "FP32"),
        (">f4", "FP32"),
        (np.bool_, "BOOL"),
        (np.uint64, "UINT64"),
        (">i8", "INT64"),
        (np.float16, "FP16"),
        (np.int8, "INT8"),
        (np.str_, "BYTES"),
        ("U7", "BYTES"),
        (np.bytes_, "BYTES"),
        ("S3", "BYTES"),
        (object, "BYTES"),
    ],
)
def test_from_numpy(dtype: object, expected: str) -> None:
    assert from_numpy(np.dtype(dtype)).name == expected


@pytest.mark.parametrize("name", FIXED)
def test_from_numpy_inverts_the_table(name: str) -> None:
    assert from_numpy(DATATYPES[name].numpy) is DATATYPES[name]


@pytest.mark.parametrize("dtype", [np.complex64, "M8[s]", "V4"])
def test_from_numpy_unsupported_raises(dtype: object) -> None:
    with pytest.raises(KeyError, match="no protocol datatype"):
        from_numpy(np.dtype(dtype))


# --- raw form ------------------------------------------------------------------------------


def test_element_count() -> None:
    assert element_count([2, 3, 4]) == 24
    assert element_count([]) == 1
    assert element_count([5, 0]) == 0


@pytest.mark.parametrize("name", FIXED)
def test_raw_round_trip(name: str) -> None:
    d = DATATYPES[name]
    array = _array(name)
    raw = to_raw(array, d)
    assert isinstance(raw, bytes)
    assert len(raw) == array.size * d.itemsize
    # Little-endian, row-major, no padding.
    assert raw == array.astype(d.numpy.newbyteorder("<")).tobytes(order="C")
    back = from_raw(raw, d, SHAPE)
    assert back.dtype == d.numpy
    assert back.shape == tuple(SHAPE)
    assert back.tobytes() == raw
    assert back.tolist() == array.tolist()


@pytest.mark.parametrize("name", FIXED)
def test_from_raw_is_a_view_over_the_buffer(name: str) -> None:
    d = DATATYPES[name]
    raw = to_raw(_array(name), d)
    buffer = bytearray(b"\xaa" * 8 + raw)  # tensor at an offset, as inside a larger message
    view = from_raw(memoryview(buffer)[8:], d, SHAPE)
    assert np.shares_memory(view, np.frombuffer(buffer, dtype=np.uint8))
    assert view.tolist() == _array(name).tolist()
    # A write to the buffer shows through: nothing was copied.
    buffer[8 : 8 + d.itemsize] = bytes(d.itemsize)
    assert view.reshape(-1)[0] == np.zeros(1, dtype=d.numpy)[0]


def test_from_raw_over_bytes_does_not_copy() -> None:
    raw = to_raw(np.arange(6, dtype=np.float32), DATATYPES["FP32"])
    view = from_raw(raw, DATATYPES["FP32"], [6])
    assert np.shares_memory(view, np.frombuffer(raw, dtype=np.uint8))


def test_from_raw_zero_elements() -> None:
    array = from_raw(b"", DATATYPES["FP32"], [0, 4])
    assert array.shape == (0, 4)
    assert array.dtype == np.float32


def test_to_raw_writes_little_endian_row_major() -> None:
    big_endian = np.array([[1, 2], [3, 4]], dtype=">i4")
    raw = to_raw(big_endian.T, DATATYPES["INT32"])  # transposed: not C-contiguous
    assert raw == np.array([1, 3, 2, 4], dtype="<i4").tobytes()
    assert raw[:4] == b"\x01\x00\x00\x00"


def test_to_raw_converts_to_the_declared_datatype() -> None:
    raw = to_raw(np.array([1.0, 2.0], dtype=np.float64), DATATYPES["FP32"])
    assert raw == np.array([1.0, 2.0], dtype="<f4").tobytes()


# --- BYTES ---------------------------------------------------------------------------------

BYTES_ELEMENTS = [b"", b"abc", b"\xff\xfe\x00\x80", "h\u00e9llo", b"", b"x" * 300]
BYTES_EXPECTED = [b"", b"abc", b"\xff\xfe\x00\x80", "h\u00e9llo".encode(), b"", b"x" * 300]


def test_bytes_round_trip_with_empty_and_non_utf8_elements() -> None:
    array = np.array(BYTES_ELEMENTS, dtype=np.object_).reshape(SHAPE)
    raw = serialize_bytes(array)
    expected_raw = b"".join(len(e).to_bytes(4, "little") + e for e in BYTES_EXPECTED)
    assert raw == expected_raw
    back = deserialize_bytes(raw, 6)
    assert back.dtype == np.object_
    assert back.tolist() == BYTES_EXPECTED
    assert all(type(e) is bytes for e in back)
    shaped = from_raw(raw, DATATYPES["BYTES"], SHAPE)
    assert shaped.shape == tuple(SHAPE)
    assert shaped.reshape(-1).tolist() == BYTES_EXPECTED
    assert to_raw(array, DATATYPES["BYTES"]) == raw


def test_bytes_form_matches_tritonclient() -> None:
    array = np.array(BYTES_ELEMENTS, dtype=np.object_).reshape(SHAPE)
    assert serialize_bytes(array) == serialize_byte_tensor(array).item()
    assert deserialize_bytes_tensor(serialize_bytes(array)).tolist() == BYTES_EXPECTED
    ours = deserialize_bytes(serialize_byte_tensor(array).item(), 6)
    assert ours.tolist() == BYTES_EXPECTED


def test_bytes_from_numpy_string_arrays() -> None:
    assert to_raw(np.array(["ab", "c"]), DATATYPES["BYTES"]) == b"\x02\0\0\0ab\x01\0\0\0c"
    assert to_raw(np.array([b"ab", b""], dtype="S2"), DATATYPES["BYTES"]) == (
        b"\x02\0\0\0ab\x00\0\0\0"
    )


def test_bytes_zero_elements() -> None:
    assert serialize_bytes(np.array([], dtype=np.object_)) == b""
    assert deserialize_bytes(b"", 0).shape == (0,)


@pytest.mark.parametrize(
    ("raw", "count", "message"),
    [
        (
            b"\x05\x00",
            1,
            r"claims 1 BYTES elements, which need at least 4 bytes, but the data has 2",
        ),
        (b"\x03\0\0\0abc\x02", 2, r"ends after 1 of 2 elements"),
        (b"\x05\0\0\0ab", 1, r"element 0 claims 5 bytes but only 2 remain"),
        (b"\x00\0\0\0\xff\xff\xff\xff", 2, r"element 1 claims 4294967295 bytes but only 0 remain"),
        (b"\x01\0\0\0ab", 1, r"1 bytes left over after 1 elements"),
        (b"\x00\0\0\0", 0, r"4 bytes left over after 0 elements"),
    ],
    ids=[
        "truncated-prefix",
        "truncated-second-prefix",
        "element-too-long",
        "huge-length",
        "trailing-bytes",
        "trailing-whole-element",
    ],
)
def test_bytes_deserialize_errors(raw: bytes, count: int, message: str) -> None:
    with pytest.raises(TensorDataError, match=message):
        deserialize_bytes(raw, count)
    with pytest.raises(TensorDataError, match=message):
        from_raw(raw, DATATYPES["BYTES"], [count])


def test_tensor_data_error_is_a_value_error() -> None:
    assert issubclass(TensorDataError, ValueError)


# --- typed contents ------------------------------------------------------------------------


def test_int8_int16_keep_low_bytes() -> None:
    wide = [1, -1, 127, 128, 255, 261, -129, 70000]
    int8 = from_contents(_contents(int_contents=wide), DATATYPES["INT8"], [8])
    assert int8.dtype == np.int8
    assert int8.tolist() == [_low_bytes_signed(v, 8) for v in wide]
    assert int8.tolist() == [1, -1, 127, -128, -1, 5, 127, 112]
    int16 = from_contents(_contents(int_contents=wide), DATATYPES["INT16"], [2, 4])
    assert int16.dtype == np.int16
    assert int16.shape == (2, 4)
    assert int16.reshape(-1).tolist() == [_low_bytes_signed(v, 16) for v in wide]


def test_uint8_uint16_keep_low_bytes() -> None:
    wide = [0, 255, 256 + 7, 65535, 65536 + 3, 2**32 - 1]
    uint8 = from_contents(_contents(uint_contents=wide), DATATYPES["UINT8"], [6])
    assert uint8.dtype == np.uint8
    assert uint8.tolist() == [v & 0xFF for v in wide]
    uint16 = from_contents(_contents(uint_contents=wide), DATATYPES["UINT16"], [6])
    assert uint16.tolist() == [v & 0xFFFF for v in wide]


@pytest.mark.parametrize("name", [n for n in FIXED if DATATYPES[n].contents_field])
def test_contents_round_trip(name: str) -> None:
    d = DATATYPES[name]
    values = _array(name).reshape(-1).tolist()
    array = from_contents(_contents(**{d.contents_field: values}), d, SHAPE)
    assert array.dtype == d.numpy
    assert array.shape == tuple(SHAPE)
    assert array.reshape(-1).tolist() == values


def test_uint64_contents_keep_large_values_exactly() -> None:
    # Values at or above 2**63 next to small ones must not detour through float64.
    values = [2**64 - 1, 1, 2**63 + 1]
    array = from_contents(_contents(uint64_contents=values), DATATYPES["UINT64"], [3])
    assert array.dtype == np.uint64
    assert array.tolist() == values


def test_bytes_contents_have_no_length_prefix() -> None:
    array = from_contents(
        _contents(bytes_contents=[b"", b"\xff", b"abc", b"d"]), DATATYPES["BYTES"], [2, 2]
    )
    assert array.dtype == np.object_
    assert array.tolist() == [[b"", b"\xff"], [b"abc", b"d"]]


def test_contents_wrong_field_raises() -> None:
    with pytest.raises(TensorDataError, match="must use 'fp32_contents', not 'int_contents'"):
        from_contents(_contents(int_contents=[1, 2]), DATATYPES["FP32"], [2])
    with pytest.raises(TensorDataError, match="must use 'int_contents', not 'uint_contents'"):
        from_contents(_contents(uint_contents=[1, 2]), DATATYPES["INT8"], [2])


def test_contents_wrong_field_beside_the_right_one_raises() -> None:
    both = _contents(fp32_contents=[1.0, 2.0], fp64_contents=[1.0, 2.0])
    with pytest.raises(TensorDataError, match="not 'fp64_contents'"):
        from_contents(both, DATATYPES["FP32"], [2])


@pytest.mark.parametrize(("count", "shape"), [(3, [2, 2]), (5, [2, 2]), (0, [2, 2]), (1, [0])])
def test_contents_wrong_element_count_raises(count: int, shape: list[int]) -> None:
    expected = element_count(shape)
    with pytest.raises(
        TensorDataError,
        match=rf"expected {expected} elements in 'fp32_contents' "
        rf"for shape \[{', '.join(map(str, shape))}\], got {count}",
    ):
        from_contents(_contents(fp32_contents=[1.0] * count), DATATYPES["FP32"], shape)


def test_contents_zero_elements() -> None:
    array = from_contents(_contents(), DATATYPES["INT32"], [0, 3])
    assert array.shape == (0, 3)
    assert array.dtype == np.int32


@pytest.mark.parametrize("name", ["FP16", "BF16"])
def test_half_precision_has_no_typed_field(name: str) -> None:
    with pytest.raises(
        TensorDataError, match=f"datatype {name} has no typed contents field.*raw_input_contents"
    ):
        from_contents(_contents(fp32_contents=[1.0]), DATATYPES[name], [1])
