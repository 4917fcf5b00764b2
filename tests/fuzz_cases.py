"""The cases of the request-decoding fuzzer: valid requests and their seeded mutations."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from tiffin.protos import protocol

pb = protocol()

CALL_TIMEOUT = 10.0  # every unary call; a call that runs into it is a hang
SHORT_DEADLINE = (0.0005, 0.02)  # the deadline of some cases, where DEADLINE_EXCEEDED is fine
INT64_MAX = 2**63 - 1


# ---- the models ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    name: str
    datatype: str
    dims: tuple[int, ...]  # without the batch dimension
    max_batch_size: int
    versions: tuple[str, ...]
    dtype: Any  # numpy

    def fits(self, shape: list[int]) -> bool:
        """Whether the server must accept `shape` for INPUT0 (data aside)."""
        expected = ([-1] if self.max_batch_size else []) + list(self.dims)
        if len(shape) != len(expected):
            return False
        if any(d < 0 or (e != -1 and d != e) for d, e in zip(shape, expected, strict=True)):
            return False
        return not self.max_batch_size or 1 <= shape[0] <= self.max_batch_size


FP32 = Model("fp32", "FP32", (4,), 8, ("1", "2"), np.dtype("<f4"))
TEXT = Model("text", "BYTES", (-1,), 0, ("1",), np.dtype(object))
INT32 = Model("int32", "INT32", (2, 3), 0, ("1",), np.dtype("<i4"))
MODELS = (FP32, TEXT, INT32)
CONTENTS_FIELD = {"FP32": "fp32_contents", "BYTES": "bytes_contents", "INT32": "int_contents"}


# ---- cases -----------------------------------------------------------------------------------


@dataclass
class Case:
    """One request: its body, what it is, and what the answer may be."""

    index: int
    model: Model
    tags: list[str]
    message: Any  # the ModelInferRequest the body came from (before any byte mutation)
    expect: tuple[list[int], bytes] | None = None  # OUTPUT0 of a success, when known
    count: int | None = None  # elements in INPUT0's data, when known
    invalid: list[str] = field(default_factory=list)  # tags that make it certainly invalid
    timeout: float = CALL_TIMEOUT
    raw_body: bytes | None = None  # set by byte-level mutations
    parse_error: str = ""

    @property
    def body(self) -> bytes:
        return self.raw_body if self.raw_body is not None else self.message.SerializeToString()

    @property
    def short_deadline(self) -> bool:
        return self.timeout < CALL_TIMEOUT

    def mark(self, tag: str, invalid: bool) -> None:
        self.tags.append(tag)
        if invalid:
            self.invalid.append(tag)


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def text_item(rng: random.Random, length: int, utf8: bool = True) -> bytes:
    """A BYTES element: UTF-8 text, or any bytes at all."""
    if not utf8:
        return rng.randbytes(length)
    return "".join(rng.choice("aZ09 _\x00é€😀") for _ in range(length)).encode()


def base_request(
    rng: random.Random, model: Model, contents: bool, utf8: bool = True
) -> tuple[Any, Any, int]:
    """A valid request for `model`: the message, its OUTPUT0 (shape, raw bytes) and count.
    BYTES elements are UTF-8 text unless `utf8` is False."""
    msg = pb.ModelInferRequest(
        model_name=model.name, model_version=rng.choice(("",) + model.versions)
    )
    if model is TEXT:
        n = rng.choice((0, 1, 2, 3, 5))
        items = [text_item(rng, rng.randint(0, 12), utf8) for _ in range(n)]
        shape, raw = [len(items)], serialize_bytes(items)
        values: list[Any] = items
    else:
        shape = (
            [rng.randint(1, model.max_batch_size), *model.dims]
            if model.max_batch_size
            else [*model.dims]
        )
        size = int(np.prod(shape))
        if model is FP32:
            array = np.array([rng.uniform(-1e6, 1e6) for _ in range(size)], model.dtype)
        else:
            array = np.array([rng.randint(-(2**31), 2**31 - 1) for _ in range(size)], model.dtype)
        raw, values = array.tobytes(), array.tolist()
    tensor = msg.inputs.add(name="INPUT0", datatype=model.datatype, shape=shape)
    if contents:
        getattr(tensor.contents, CONTENTS_FIELD[model.datatype]).extend(values)
    else:
        msg.raw_input_contents.append(raw)
    return msg, (shape, raw), len(values)


def count_of(shape: list[int]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


# ---- structure-aware mutations ---------------------------------------------------------------
# Each takes the case and the generator and marks the case with a tag, saying whether the
# mutation makes the request certainly invalid. Categories are applied in MUTATIONS' order.

HUGE_NAME = "m" * 1_000_000
BAD_NAMES = [
    "", "nope", "fp32/1", "../fp32", "..", ".", "fp32\x00", "fp32/../int32", "модель", "fp32 ",
    " fp32", "FP32", "fp32\n", "%2e%2e", "\u202efp32", "a" * 129, "a" * 70_000,
]  # fmt: skip
BAD_VERSIONS = [
    " 1", "1 ", "١", "-1", "+1", "1.0", "0x1", "abc", "99999999999999999999",
    str(INT64_MAX + 1), str(INT64_MAX), "0", "3", "\x00", "1\x00", "١٢", "¹", "Ⅰ", "v1", "9" * 400,
]  # fmt: skip
BAD_DATATYPES = [
    "FP33", "", "fp32", "TYPE_FP32", "FP32\x00", "FP32 ", "Ω", "INT32", "INT64", "FP16",
    "BF16", "BOOL", "BYTES", "UINT8", "STRING", "X" * 5000,
]  # fmt: skip
SHAPES = [
    [2**40], [2**40, 4], [2**26], [2**31], [2**32 + 1], [-1], [-1, 4], [1, -4], [0], [0, 4],
    [1] * 40, [2] * 40, [], [INT64_MAX, 4], [-(2**63), 4], [2**62, 2**62], [2**32, 2**32, 4],
    [1, 4, 1], [9, 4], [3, 3], [2, 3], [6], [1, 8], [2, 3, 1], [1, 2, 3], [8, 4], [1, 4],
]  # fmt: skip


def mutate_shape(case: Case, rng: random.Random) -> None:
    if not case.message.inputs:
        return case.mark("shape:no-input", False)
    if rng.random() < 0.7:
        shape = list(rng.choice(SHAPES))
    else:
        choices = [-2, -1, 0, 1, 2, 3, 4, 5, 8, 9, 2**31, 2**32 + 1]
        shape = [rng.choice(choices) for _ in range(rng.randint(0, 5))]
    tensor = case.message.inputs[0]
    tensor.shape[:] = shape
    raw = case.message.raw_input_contents
    small = all(d >= 0 for d in shape) and count_of(shape) <= 4096
    if small and raw and not tensor.HasField("contents") and rng.random() < 0.3:
        n = count_of(shape)  # data to match: n zeros of FP32/INT32, or n empty BYTES elements
        raw[0] = bytes(4 * n)
        case.count, case.expect = n, (shape, raw[0])
        return case.mark(f"shape+data:{shape}", not case.model.fits(shape))
    fits = case.model.fits(shape) and count_of(shape) == case.count
    if fits and case.expect:
        case.expect = (shape, case.expect[1])
    case.mark(f"shape:{shape}", not fits)


def forget_data_marks(case: Case) -> None:
    """A mutation that replaces INPUT0's shape and data supersedes what earlier ones said
    about them."""
    case.invalid = [t for t in case.invalid if not t.startswith(("shape", "bytes", "contents"))]


def mutate_datatype(case: Case, rng: random.Random) -> None:
    if not case.message.inputs:
        return case.mark("datatype:no-input", False)
    datatype = rng.choice(BAD_DATATYPES)
    case.message.inputs[0].datatype = datatype
    case.mark(f"datatype:{datatype[:20]!r}", datatype != case.model.datatype)


def mutate_bytes_payload(case: Case, rng: random.Random) -> None:
    """BYTES data whose length prefixes or element count disagree with the bytes (TEXT only)."""
    if case.model is not TEXT or not case.message.inputs:
        return case.mark("bytes:not-text", False)
    forget_data_marks(case)
    tensor = case.message.inputs[0]
    tensor.ClearField("contents")
    if not case.message.raw_input_contents:
        case.message.raw_input_contents.append(b"")
    items = [text_item(rng, rng.randint(0, 6)) for _ in range(rng.randint(1, 4))]
    payload, shape, lie = serialize_bytes(items), [len(items)], rng.randrange(12)
    last = len(payload) - len(items[-1]) - 4  # the last element's length prefix
    if lie == 0:
        payload = payload[:last] + struct.pack("<I", 2**32 - 1) + payload[last + 4 :]
    elif lie == 1:
        payload = payload[:last] + struct.pack("<I", len(items[-1]) + 1) + payload[last + 4 :]
    elif lie == 2:
        payload = payload[:-1] if items[-1] else payload[:-2]
    elif lie == 3:
        payload += rng.randbytes(rng.randint(1, 9))
    elif lie == 4:
        shape = [len(items) + 1]
    elif lie == 5:
        shape = [len(items) - 1]
    elif lie == 6:
        shape, payload = [2**26], bytes(40)  # ten empty elements claiming 2**26
    elif lie == 7:
        shape, payload = [2**40], bytes(8)
    elif lie == 8:
        shape, payload = [2**31], bytes(4)
    elif lie == 9:
        shape, payload = [2**62, 2**62][: rng.randint(1, 2)], bytes(4)
    else:  # lies about nothing: many empty elements, or one big one
        items = [b""] * 1000 if lie == 10 else [text_item(rng, 30_000)]
        payload, shape = serialize_bytes(items), [len(items)]
        tensor.shape[:] = shape
        case.message.raw_input_contents[0] = payload
        case.count, case.expect = len(items), (shape, payload)
        return case.mark(f"bytes:{len(items)}-honest", False)
    tensor.shape[:] = shape
    case.message.raw_input_contents[0] = payload
    case.mark(f"bytes:lie-{lie}", True)


def mutate_contents(case: Case, rng: random.Random) -> None:
    """Typed contents in the wrong field, of the wrong length, or beside raw data."""
    if not case.message.inputs:
        return case.mark("contents:no-input", False)
    tensor = case.message.inputs[0]
    right = CONTENTS_FIELD[case.model.datatype]
    fields = [
        "bool_contents", "int_contents", "int64_contents", "uint_contents",
        "uint64_contents", "fp32_contents", "fp64_contents", "bytes_contents",
    ]  # fmt: skip
    kind = rng.randrange(5)
    n = case.count or 0
    sample = {
        "bool_contents": True, "int_contents": -7, "int64_contents": -(2**62),
        "uint_contents": 2**32 - 1, "uint64_contents": 2**64 - 1, "fp32_contents": 1.5,
        "fp64_contents": 1e300, "bytes_contents": b"ok\x00",
    }  # fmt: skip
    if kind == 0:  # a wrong field only
        wrong = rng.choice([f for f in fields if f != right])
        tensor.ClearField("contents")
        getattr(tensor.contents, wrong).extend([sample[wrong]] * max(n, 1))
        case.message.ClearField("raw_input_contents")
        return case.mark(f"contents:{wrong}", True)
    if kind == 1:  # the right field and a wrong one
        wrong = rng.choice([f for f in fields if f != right])
        getattr(tensor.contents, right).extend([sample[right]] * n)
        getattr(tensor.contents, wrong).append(sample[wrong])
        case.message.ClearField("raw_input_contents")
        return case.mark(f"contents:{right}+{wrong}", True)
    if kind == 2:  # the right field, one element more or fewer than the data had
        forget_data_marks(case)
        tensor.ClearField("contents")
        length = n + 1 if n == 0 or rng.random() < 0.5 else n - 1
        getattr(tensor.contents, right).extend([sample[right]] * length)
        tensor.contents.SetInParent()
        case.message.ClearField("raw_input_contents")
        shape = list(tensor.shape)  # an earlier shape mutation may have made them agree
        valid = case.model.fits(shape) and count_of(shape) == length
        case.count, case.expect = length, None
        return case.mark(f"contents:{length}-elements-for-{shape[:4]}", not valid)
    if kind == 3:  # right contents beside raw data
        if not tensor.HasField("contents"):
            getattr(tensor.contents, right).extend([sample[right]] * n)
            tensor.contents.SetInParent()
        case.message.raw_input_contents.append(b"\x00" * 4 * max(n, 1))
        return case.mark("contents:and-raw", True)
    # An empty contents message: right only for a shape of no elements.
    forget_data_marks(case)
    tensor.ClearField("contents")
    tensor.contents.SetInParent()
    case.message.ClearField("raw_input_contents")
    shape = list(tensor.shape)
    valid = case.model.fits(shape) and count_of(shape) == 0
    case.count, case.expect = 0, (shape, b"") if valid else None
    case.mark(f"contents:empty-for-{shape[:4]}", not valid)


def mutate_raw_count(case: Case, rng: random.Random) -> None:
    raw = case.message.raw_input_contents
    kind = rng.randrange(4)
    inputs = case.message.inputs
    if kind == 0 and raw and inputs and not inputs[-1].HasField("contents"):
        raw.pop()  # the last input's data
        return case.mark("raw:missing", True)
    if kind == 1 and raw:
        raw.append(raw[0])
        return case.mark("raw:duplicated", True)
    if kind == 2:
        raw.extend([b""] * 200)
        return case.mark("raw:200-empty-extra", True)
    raw.append(rng.randbytes(rng.randint(0, 64)))
    case.mark("raw:extra", True)


def mutate_inputs(case: Case, rng: random.Random) -> None:
    inputs, raw = case.message.inputs, case.message.raw_input_contents
    kind = rng.randrange(5)
    if kind == 0 and inputs:
        inputs.add().CopyFrom(inputs[0])
        if raw:
            raw.append(raw[0])
        return case.mark("inputs:duplicate", True)
    if kind == 1 and inputs:
        name = rng.choice(["INPUT1", "", "input0", "INPUT0\x00", "INPUT0 ", "x" * 100_000])
        inputs[0].name = name
        return case.mark(f"inputs:name-{name[:12]!r}", True)
    if kind == 2:
        del inputs[:]
        case.message.ClearField("raw_input_contents")
        return case.mark("inputs:none", True)
    if kind == 3:
        for i in range(300):
            inputs.add(name=f"EXTRA{i}", datatype=case.model.datatype, shape=[1])
        return case.mark("inputs:300-unknown", True)
    if not inputs:
        return case.mark("inputs:params-no-input", True)
    key, member, value, invalid = rng.choice(INPUT_PARAMETERS)
    set_parameter(inputs[0].parameters[key], member, value)
    case.mark(f"inputs:param-{key[:24]}", invalid)


def mutate_outputs(case: Case, rng: random.Random) -> None:
    outputs = case.message.outputs
    kind = rng.randrange(6)
    if kind == 0:
        name = rng.choice(["OUTPUT1", "", "output0", "INPUT0", "O" * 100_000])
        outputs.add(name=name)
        return case.mark(f"outputs:unknown-{name[:12]!r}", True)
    if kind == 1:
        outputs.add(name="OUTPUT0")
        outputs.add(name="OUTPUT0")
        return case.mark("outputs:duplicate", True)
    out = outputs.add(name="OUTPUT0")
    if kind == 2:
        out.parameters["classification"].int64_param = rng.choice([1, 0, -1, 2**62])
        return case.mark("outputs:classification", True)
    if kind == 3:
        out.parameters["shared_memory_region"].string_param = "r" * rng.choice([1, 100_000])
        return case.mark("outputs:shared-memory", True)
    if kind == 4:
        out.parameters["binary_data"].bool_param = True
        return case.mark("outputs:binary_data", False)
    case.mark("outputs:OUTPUT0", False)


def set_parameter(param: Any, member: str | None, value: Any) -> None:
    if member is None:
        param.Clear()  # no member of the oneof set
    else:
        setattr(param, member, value)


# (key, InferParameter member or None for none, value, certainly invalid)
REQUEST_PARAMETERS = [
    ("priority", "int64_param", -1, False),
    ("priority", "int64_param", INT64_MAX, False),
    ("priority", "uint64_param", 2**64 - 1, False),
    ("priority", "string_param", "high", True),
    ("priority", None, None, True),
    ("timeout", "int64_param", INT64_MAX, False),
    ("timeout", "int64_param", -1, False),
    ("timeout", "int64_param", 1, False),
    ("timeout", "double_param", 1.5, True),
    ("timeout", "uint64_param", 2**64 - 1, True),
    ("triton_foo", "bool_param", True, True),
    ("triton_", "string_param", "", True),
    ("triton_enable_empty_final_response", "bool_param", True, False),
    ("triton_enable_empty_final_response", "int64_param", 1, True),
    ("sequence_id", "uint64_param", 2**64 - 1, False),
    ("sequence_id", "double_param", 1.0, True),
    ("sequence_start", "string_param", "yes", True),
    ("sequence_end", "bool_param", True, False),
    ("", "string_param", "", False),
    ("ключ\x00", "double_param", float("nan"), False),
    ("k" * 10_000, "string_param", "v" * 10_000, False),
    ("binary_data_output", "bool_param", True, False),
    ("headers", None, None, False),
]
INPUT_PARAMETERS = [
    ("shared_memory_region", "string_param", "region", True),
    ("shared_memory_region", "string_param", "r" * 100_000, True),
    ("shared_memory_byte_size", "int64_param", -1, True),
    ("shared_memory_offset", "uint64_param", 2**64 - 1, True),
    ("binary_data_size", "int64_param", 2**62, False),
    ("anything", "double_param", float("inf"), False),
]


def mutate_parameters(case: Case, rng: random.Random) -> None:
    chosen: dict[str, tuple[str | None, Any, bool]] = {}
    for key, member, value, invalid in rng.sample(REQUEST_PARAMETERS, rng.randint(1, 3)):
        chosen.setdefault(key, (member, value, invalid))  # one value per key: a map
    for key, (member, value, invalid) in chosen.items():
        set_parameter(case.message.parameters[key], member, value)
        case.mark(f"param:{key[:36]}={member}:{str(value)[:24]}", invalid)


def mutate_name(case: Case, rng: random.Random) -> None:
    name = HUGE_NAME if rng.random() < 0.08 else rng.choice(BAD_NAMES)
    case.message.model_name = name
    case.mark(f"name:{name[:24]!r}({len(name)})", True)


def mutate_version(case: Case, rng: random.Random) -> None:
    version = rng.choice(BAD_VERSIONS + ["01", "1", ""])
    case.message.model_version = version
    valid = version in ("", "01") + case.model.versions
    case.mark(f"version:{version[:24]!r}", not valid)


def mutate_id(case: Case, rng: random.Random) -> None:
    case.message.id = rng.choice(["i" * 100_000, "ид\x00\u202e", "", "\U0001f600" * 10])
    case.mark("id", False)


def mutate_deadline(case: Case, rng: random.Random) -> None:
    case.timeout = rng.uniform(*SHORT_DEADLINE)
    case.mark("deadline", False)


MUTATIONS: list[tuple[Callable[[Case, random.Random], None], float]] = [
    (mutate_shape, 3),
    (mutate_datatype, 1.5),
    (mutate_bytes_payload, 2),
    (mutate_contents, 2),
    (mutate_raw_count, 1.5),
    (mutate_inputs, 1.5),
    (mutate_outputs, 1.5),
    (mutate_parameters, 2),
    (mutate_name, 1),
    (mutate_version, 1.5),
    (mutate_id, 0.5),
    (mutate_deadline, 0.5),
]


def structured_case(index: int, rng: random.Random) -> Case:
    """A valid request with one to three mutations (some cases stay valid: no mutation)."""
    model = rng.choice(MODELS)
    case = Case(index, model, [], None)
    # Any bytes are a valid BYTES element on the wire; the ONNX string model wants UTF-8.
    utf8 = model is not TEXT or rng.random() < 0.85
    contents = rng.random() < 0.25
    case.message, case.expect, case.count = base_request(rng, model, contents, utf8)
    case.message.id = f"case-{index}"
    if not utf8:
        case.tags.append("text:any-bytes")
    if rng.random() < 0.06:
        case.tags.append("valid")
        return case
    functions, weights = zip(*MUTATIONS, strict=True)
    chosen = set()
    for _ in range(rng.choices((1, 2, 3), (6, 3, 1))[0]):
        chosen.add(rng.choices(functions, weights)[0])
    for function in functions:  # a fixed order, so that later ones see earlier ones' effects
        if function in chosen:
            function(case, rng)
    return case


def named_cases() -> list[Case]:
    """The cases this fuzzer's brief names, sent once each whatever the seed draws."""
    edits: list[tuple[Model, str, bool, dict[str, Any]]] = [
        (TEXT, "BYTES [2**26] in 40 bytes", True, {"shape": [2**26], "raw": bytes(40)}),
        (TEXT, "BYTES [2**40] in 8 bytes", True, {"shape": [2**40], "raw": bytes(8)}),
        (FP32, "FP32 [2**40]", True, {"shape": [2**40], "raw": bytes(16)}),
        (FP32, "FP32 [2**40,4]", True, {"shape": [2**40, 4], "raw": bytes(16)}),
        (FP32, "FP32 [-1,4]", True, {"shape": [-1, 4], "raw": bytes(16)}),
        (INT32, "INT32 40 dims", True, {"shape": [1] * 40, "raw": bytes(24)}),
        (FP32, "priority -1", False, {"param": ("priority", "int64_param", -1)}),
        (FP32, "timeout huge", False, {"param": ("timeout", "int64_param", INT64_MAX)}),
        (FP32, "triton_x", True, {"param": ("triton_x", "bool_param", True)}),
    ]
    for name in (HUGE_NAME, "fp32/1", "..", "fp32\x00", "модель"):
        edits.append((FP32, f"name {name[:12]!r} ({len(name)})", True, {"model_name": name}))
    for version in (" 1", "١", "-1", "99999999999999999999", "abc"):
        edits.append((FP32, f"version {version!r}", True, {"model_version": version}))
    cases = []
    for index, (model, tag, invalid, edit) in enumerate(edits):
        case = Case(-1 - index, model, [], None)
        case.message, case.expect, case.count = base_request(random.Random(7), model, False)
        msg = case.message
        if "shape" in edit:
            msg.inputs[0].shape[:] = edit["shape"]
            msg.raw_input_contents[0] = edit["raw"]
        if "param" in edit:
            key, member, value = edit["param"]
            set_parameter(msg.parameters[key], member, value)
        for attribute in ("model_name", "model_version"):
            if attribute in edit:
                setattr(msg, attribute, edit[attribute])
        case.mark(f"named:{tag}", invalid)
        cases.append(case)
    return cases


# ---- byte-level mutations --------------------------------------------------------------------


def byte_case(index: int, rng: random.Random) -> Case:
    """A request (valid or mutated) whose serialized bytes are then damaged."""
    case = structured_case(index, rng)
    body = bytearray(case.message.SerializeToString())
    kind = rng.randrange(8)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            if body:
                body[rng.randrange(len(body))] ^= 1 << rng.randrange(8)
        tag = "flip-bits"
    elif kind == 1:
        body = body[: rng.randrange(len(body) + 1)]
        tag = "truncate"
    elif kind == 2:
        body = bytearray(rng.randbytes(rng.randint(0, 300)))
        tag = "random"
    elif kind == 3:
        body += rng.randbytes(rng.randint(1, 64))
        tag = "append-garbage"
    elif kind == 4:  # a field whose length runs past the end
        body += bytes([0x3A]) + b"\xff\xff\xff\xff\x07" + rng.randbytes(8)
        tag = "overlong-length"
    elif kind == 5:  # a varint that never ends
        body += bytes([0x08]) + b"\xff" * rng.randint(10, 40)
        tag = "endless-varint"
    elif kind == 6:  # bytes that are not UTF-8 where a string goes (model_name)
        body = bytearray(b"\x0a\x02\xc3\x28") + body
        tag = "bad-utf8"
    else:
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(body) + 1)
            if rng.random() < 0.5 and at < len(body):
                del body[at]
            else:
                body[at:at] = rng.randbytes(1)
        tag = "insert-delete"
    case.raw_body = bytes(body)
    case.tags.append(f"bytes:{tag}")
    case.expect = None  # what the damaged body means is not known here
    try:
        pb.ModelInferRequest.FromString(case.raw_body)
        case.invalid = []  # it parses: it may mean a valid request
    except DecodeError as exc:
        case.parse_error = str(exc)[:80]
        case.invalid = [f"bytes:{tag}(undecodable)"]
    return case
