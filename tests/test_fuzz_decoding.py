"""A fuzzer over request decoding, against a real `serverctl serve` process.

Thousands of ModelInferRequests, mutated from valid ones by a seeded generator (so a run is
reproducible: the same SEED gives the same cases), go to three identity models over raw gRPC,
unary and through ModelStreamInfer: structure-aware mutations (shapes, datatypes, BYTES length
prefixes, raw/typed contents, inputs, outputs, parameters, model names and versions) and
byte-level ones (bit flips, truncation, garbage), sent as bytes so they need not parse.

Every answer must be a response or a status in ALLOWED, with a bounded message. A request that
is certainly invalid must fail, and a success must echo its input (the models are identities).
Afterwards the server must be alive and serving, with its memory, threads and log in bounds.
Each phase collects every failure and reports them grouped, one line per distinct failure
with the smallest request that showed it, rather than stopping at the first.
"""

from __future__ import annotations

import random
import re
import resource
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError

from conftest import ServerProcess
from models import identity, write_model
from tiffin.protos import MESSAGE_SIZE_OPTIONS, method_path, protocol

pb = protocol()

SEED = 20250607
UNARY_CASES = 8000
BYTE_CASES = 4000
# Per stream flavour: (streams, requests per stream). A stream that turns errors into its
# status ends at the first one, so that flavour sends more, shorter streams.
STREAMS = {"in-band": (40, 25), "abort-on-error": (200, 4), "byte-level": (40, 25)}

CALL_TIMEOUT = 10.0  # every unary call; a call that runs into it is a hang
STREAM_TIMEOUT = 15.0
SHORT_DEADLINE = (0.0005, 0.02)  # the deadline of some cases, where DEADLINE_EXCEEDED is fine
PHASE_BUDGET = 45.0  # seconds; a phase that runs longer stops and says so (about 4x normal)
MAX_HANGS = 2  # consecutive hangs before a phase gives up on a wedged server

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED,
}
MAX_DETAILS = 1024  # bytes of an error message, even when the request holds a 1 MB name
# The largest request here is about 1 MB, so no single one has any business raising the
# server's peak memory (VmHWM) by 64 MB; one that does allocates for what it claims, not for
# what it sent. Over the whole run, growth beyond 200 MB (gRPC buffers, allocator
# fragmentation and onnxruntime's arena stay far below it) is a leak.
MAX_PEAK_STEP = 64 << 20
MAX_RSS_GROWTH = 200 << 20
# The server's address space is capped at its warmed-up size plus this, so that a server that
# allocates for what a request claims (2**31 BYTES elements: 16 GiB) fails that request with a
# MemoryError instead of taking the test machine's memory.
ADDRESS_SPACE_HEADROOM = 3 << 30
MAX_THREAD_GROWTH = 16  # requests are sent one at a time; streams end before the check
MAX_TRACEBACKS = 5

INT64_MAX = 2**63 - 1
# Room for whatever status message the server sends: with gRPC's default 8 KiB limit on
# metadata, a 1 MB message reaches the client as RESOURCE_EXHAUSTED and would pass unseen.
CHANNEL_OPTIONS = [*MESSAGE_SIZE_OPTIONS, ("grpc.max_metadata_size", 16 << 20)]


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

FP32_CONFIG = """\
backend: onnxruntime
max_batch_size: 8
version_policy: {all: {}}
dynamic_batching:
  max_queue_delay_microseconds: 100
  priority_levels: 2
  default_queue_policy: {allow_timeout_override: true}
instance_group: [{kind: cpu, count: 1}]
"""
INLINE_CONFIG = "backend: onnxruntime\nmax_batch_size: 0\ninstance_group: [{kind: inline}]\n"


def proc_status(pid: int) -> dict[str, int]:
    """VmSize, VmRSS and VmHWM in bytes, and Threads, from /proc/PID/status."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmSize", "VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
        elif key == "Threads":
            values[key] = int(rest)
    return values


@dataclass
class Fuzzed:
    """The server under test, its state before any fuzzing, and its highest peak since."""

    server: ServerProcess
    start: dict[str, int]
    peak: int = 0

    def reset_peak(self) -> int:
        """Resets the server's VmHWM to its current RSS where Linux allows it, so that each
        request's own peak shows; returns the peak it starts from."""
        try:
            Path(f"/proc/{self.server.proc.pid}/clear_refs").write_text("5")
        except OSError:
            pass  # then only requests that raise the peak of the whole run are seen
        try:
            return proc_status(self.server.proc.pid)["VmHWM"]
        except (OSError, KeyError):
            return 0  # it died: watch() says so


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    repo = tmp_path_factory.mktemp("fuzz")
    write_model(repo, "fp32", FP32_CONFIG, {1: identity, 2: identity})
    text = partial(identity, datatype="BYTES", shape=["n"])
    write_model(repo, "text", INLINE_CONFIG, {1: text})
    write_model(
        repo, "int32", INLINE_CONFIG, {1: partial(identity, datatype="INT32", shape=[2, 3])}
    )
    server = ServerProcess(repo, "--shutdown-grace-seconds", "5")
    try:
        for model in MODELS:  # warm up every path once before taking the baseline
            check_serves(server, model)
        start = proc_status(server.proc.pid)
        limit = start["VmSize"] + ADDRESS_SPACE_HEADROOM
        _, hard = resource.prlimit(server.proc.pid, resource.RLIMIT_AS)
        resource.prlimit(server.proc.pid, resource.RLIMIT_AS, (limit, hard))
        yield Fuzzed(server, start)
    finally:
        try:
            server.stop(timeout=15)
        except Exception:  # killed after the timeout; the tests have said what went wrong
            pass


def check_serves(server: ServerProcess, model: Model) -> None:
    """A well-formed request answers with its own input."""
    rng = random.Random(1)
    case = Case(0, model, [], pb.ModelInferRequest())
    while not case.count:  # some data, not an empty BYTES tensor
        case.message, case.expect, case.count = base_request(rng, model, contents=False)
    with grpc.insecure_channel(server.url, options=CHANNEL_OPTIONS) as channel:
        response = unary(channel)(case.body, timeout=CALL_TIMEOUT)
    assert echo_problem(case, response) is None, echo_problem(case, response)


def unary(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(
        method_path("ModelInfer"),
        request_serializer=bytes,  # the body is sent as it is, parseable or not
        response_deserializer=pb.ModelInferResponse.FromString,
    )


def require_alive(fuzzed: Fuzzed) -> None:
    """Fails fast when an earlier phase killed or wedged the server."""
    if fuzzed.server.proc.poll() is not None:
        pytest.fail(
            f"the server exited ({fuzzed.server.proc.returncode}) during an earlier phase:\n"
            f"{fuzzed.server.log()[-3000:]}"
        )
    with grpc.insecure_channel(fuzzed.server.url) as channel:
        live = channel.unary_unary(
            method_path("ServerLive"),
            request_serializer=pb.ServerLiveRequest.SerializeToString,
            response_deserializer=pb.ServerLiveResponse.FromString,
        )
        try:
            assert live(pb.ServerLiveRequest(), timeout=3).live
        except grpc.RpcError as err:
            pytest.fail(f"the server no longer answers ServerLive: {err.code()} {err.details()}")


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


# ---- judging answers -------------------------------------------------------------------------


def echo_problem(case: Case, response: Any) -> str | None:
    """Why a successful response is wrong for `case`, or None."""
    if case.expect is None:
        return None
    shape, raw = case.expect
    outputs = list(response.outputs)
    if [o.name for o in outputs] != ["OUTPUT0"] or len(response.raw_output_contents) != 1:
        return f"outputs {[o.name for o in outputs]} with {len(response.raw_output_contents)} raw"
    out = outputs[0]
    if out.datatype != case.model.datatype or list(out.shape) != list(shape):
        return (
            f"OUTPUT0 is {out.datatype} {list(out.shape)}, expected {case.model.datatype} {shape}"
        )
    if response.raw_output_contents[0] != raw:
        return f"OUTPUT0 holds other bytes than INPUT0 ({len(response.raw_output_contents[0])} B)"
    return None


def clip(text: str, limit: int = 60) -> str:
    shown = repr(text[:limit])
    return shown + (f"+{len(text) - limit} chars" if len(text) > limit else "")


def summarize(case: Case) -> str:
    """A compact description of a case's request, for the failure report."""

    def params(map_: Any) -> str:
        shown = {clip(k, 20): map_[k].WhichOneof("parameter_choice") for k in map_}
        return f" params={shown}" if shown else ""

    msg = case.message
    inputs = []
    for t in msg.inputs[:3]:
        fields = [f"{f.name}[{len(v)}]" for f, v in t.contents.ListFields()]
        inputs.append(
            f"{clip(t.name, 12)} {clip(t.datatype, 12)} {list(t.shape)[:8]}{fields}"
            f"{params(t.parameters)}"
        )
    outputs = [f"{clip(o.name, 12)}{params(o.parameters)}" for o in msg.outputs[:3]]
    raw = [len(r) for r in msg.raw_input_contents[:4]]
    text = (
        f"model_name={clip(msg.model_name, 24)} version={clip(msg.model_version, 24)} "
        f"inputs({len(msg.inputs)})={inputs} raw_input_contents bytes={raw}"
        f"{'...' if len(msg.raw_input_contents) > 4 else ''} outputs={outputs}"
        f"{params(msg.parameters)}"
    )
    if case.raw_body is not None:
        text += f"; then damaged to {len(case.raw_body)} B {case.raw_body[:40].hex()}"
        if case.parse_error:
            text += f" (protobuf: {case.parse_error})"
    return text


def normalize(message: str) -> str:
    """A failure's message with the parts that vary per request blanked, to group by."""
    message = re.sub(r"'[^']*'", "'…'", message[:300])
    return re.sub(r"\d+", "N", message)[:100]


@dataclass
class Finding:
    count: int
    case: Case
    detail: str


class Findings:
    """Failures of one phase, grouped by what went wrong; the smallest request of each kept."""

    def __init__(self, phase: str) -> None:
        self.phase = phase
        self.groups: dict[tuple[str, str], Finding] = {}
        self.cases = 0
        self.statuses: dict[str, int] = {}
        self.started = time.monotonic()

    def add(self, kind: str, key: str, case: Case, detail: str) -> None:
        group = self.groups.get((kind, key))
        if group is None:
            self.groups[(kind, key)] = Finding(1, case, detail)
            return
        group.count += 1
        if len(case.body) < len(group.case.body):
            group.case, group.detail = case, detail

    def judge(self, case: Case, code: grpc.StatusCode, details: str, response: Any) -> None:
        """Checks one answer: a unary status with its details, or a stream's in-band one."""
        self.cases += 1
        self.statuses[code.name] = self.statuses.get(code.name, 0) + 1
        if len(details.encode()) > MAX_DETAILS:
            self.add(
                "message over 1 KiB",
                f"{code.name} {normalize(details)}",
                case,
                f"{code.name}, {len(details.encode())} bytes: {clip(details, 160)}",
            )
        if code == grpc.StatusCode.OK:
            if case.invalid:
                reason = f"invalid because of {case.invalid}"
                self.add("accepted an invalid request", case.invalid[0][:50], case, reason)
            elif problem := echo_problem(case, response):
                self.add("wrong output", normalize(problem), case, problem)
            return
        allowed = ALLOWED | ({grpc.StatusCode.DEADLINE_EXCEEDED} if case.short_deadline else set())
        if code not in allowed:
            self.add(
                f"status {code.name}",
                normalize(details),
                case,
                f"{code.name}: {clip(details, 200)}",
            )

    def over_budget(self) -> bool:
        if time.monotonic() - self.started < PHASE_BUDGET:
            return False
        self.add(
            "too slow",
            "budget",
            Case(-1, FP32, [], pb.ModelInferRequest()),
            f"only {self.cases} cases in {PHASE_BUDGET:.0f} s",
        )
        return True

    def report(self) -> str:
        elapsed = time.monotonic() - self.started
        lines = [
            f"{self.phase}: {len(self.groups)} distinct failure(s) in {self.cases} cases "
            f"({elapsed:.1f} s; statuses {self.statuses})"
        ]
        for n, ((kind, _), f) in enumerate(sorted(self.groups.items(), key=lambda g: g[0]), 1):
            lines.append(f"{n:3}. [{f.count}x] {kind}: {f.detail}")
            lines.append(f"     smallest: case {f.case.index} {f.case.tags}")
            lines.append(f"     {summarize(f.case)}")
        return "\n".join(lines)

    def check(self) -> None:
        report = self.report()
        if self.groups:
            pytest.fail(report, pytrace=False)
        print(report)  # the statistics, for -s


def watch(
    fuzzed: Fuzzed, findings: Findings, case: Case, peak_before: int, during: str = ""
) -> bool:
    """After each call (or stream, `during`): False if the server died; records a jump in
    its peak memory."""
    proc = fuzzed.server.proc
    try:
        peak = proc_status(proc.pid)["VmHWM"]  # a zombie has no VmHWM
    except (OSError, KeyError):
        peak = -1
    if peak < 0 or proc.poll() is not None:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        findings.add("server died", "died", case, f"exit status {proc.poll()} after this case")
        return False
    fuzzed.peak = max(fuzzed.peak, peak)
    if peak - peak_before > MAX_PEAK_STEP:
        step = (peak - peak_before) >> 20
        findings.add(
            "memory", "stream" if during else "", case, f"peak RSS rose by {step} MB{during}"
        )
    return True


# ---- the phases ------------------------------------------------------------------------------


def run_unary(fuzzed: Fuzzed, findings: Findings, cases: Iterator[Case]) -> None:
    hangs = 0
    with grpc.insecure_channel(fuzzed.server.url, options=CHANNEL_OPTIONS) as channel:
        infer = unary(channel)
        for case in cases:
            if findings.over_budget():
                break
            peak = fuzzed.reset_peak()
            started = time.monotonic()
            response, details = None, ""
            try:
                response, code = infer(case.body, timeout=case.timeout), grpc.StatusCode.OK
            except grpc.RpcError as err:
                code, details = err.code(), err.details() or ""
            if not watch(fuzzed, findings, case, peak):
                break
            if not case.short_deadline and time.monotonic() - started >= CALL_TIMEOUT * 0.9:
                findings.add("hang", "hang", case, f"no answer within {CALL_TIMEOUT:.0f} s")
                hangs += 1
                if hangs >= MAX_HANGS:
                    break
                continue
            hangs = 0
            findings.judge(case, code, details, response)


def test_structured_mutations_unary(fuzzed: Fuzzed) -> None:
    require_alive(fuzzed)
    rng = random.Random(SEED)
    findings = Findings("structure-aware, ModelInfer")
    cases = [*named_cases(), *(structured_case(i, rng) for i in range(UNARY_CASES))]
    run_unary(fuzzed, findings, iter(cases))
    findings.check()


def test_byte_mutations_unary(fuzzed: Fuzzed) -> None:
    require_alive(fuzzed)
    rng = random.Random(SEED + 1)
    findings = Findings("byte-level, ModelInfer")
    run_unary(fuzzed, findings, (byte_case(i, rng) for i in range(BYTE_CASES)))
    findings.check()


@pytest.mark.parametrize("flavour", list(STREAMS))
def test_stream_mutations(fuzzed: Fuzzed, flavour: str) -> None:
    """Streams of mutated requests: in-band errors (the default), errors as a status
    (triton_grpc_error), and damaged bodies."""
    require_alive(fuzzed)
    rng = random.Random(SEED + 2 + list(STREAMS).index(flavour))
    streams, length = STREAMS[flavour]
    findings = Findings(f"ModelStreamInfer, {flavour}")
    make = byte_case if flavour == "byte-level" else structured_case
    metadata = [("triton_grpc_error", "true")] if flavour == "abort-on-error" else []
    with grpc.insecure_channel(fuzzed.server.url, options=CHANNEL_OPTIONS) as channel:
        stream = channel.stream_stream(
            method_path("ModelStreamInfer"),
            request_serializer=bytes,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        for s in range(streams):
            if findings.over_budget():
                break
            cases = [make(s * length + i, rng) for i in range(length)]
            for case in cases:
                case.timeout = STREAM_TIMEOUT  # a stream has one deadline, a long one
            peak = fuzzed.reset_peak()
            started = time.monotonic()
            call = stream(iter([c.body for c in cases]), timeout=STREAM_TIMEOUT, metadata=metadata)
            responses: list[Any] = []
            try:
                responses.extend(call)
            except grpc.RpcError:
                pass
            code, details = call.code(), call.details() or ""
            during = f" during stream {s} (cases {cases[0].index}..{cases[-1].index})"
            if not watch(fuzzed, findings, cases[0], peak, during):
                break
            if time.monotonic() - started >= STREAM_TIMEOUT * 0.9:
                findings.add("hang", "stream", cases[0], f"stream {s} did not end in time")
                break
            judge_stream(findings, cases, responses, code, details, flavour)
    findings.check()


def judge_stream(
    findings: Findings,
    cases: list[Case],
    responses: list[Any],
    code: grpc.StatusCode,
    details: str,
    flavour: str,
) -> None:
    if len(responses) > len(cases):
        findings.add("stream", "extra responses", cases[0], f"{len(responses)} responses")
        return
    for case, response in zip(cases, responses, strict=False):
        error = response.error_message
        if error.startswith("internal error"):
            findings.add("stream in-band internal error", normalize(error), case, clip(error, 200))
        in_band = grpc.StatusCode.INVALID_ARGUMENT if error else grpc.StatusCode.OK
        findings.judge(case, in_band, error, response.infer_response)
    if code == grpc.StatusCode.OK and len(responses) < len(cases):
        # the first request without an answer is the one that stopped the stream
        lost = f"{len(responses)} responses to {len(cases)} requests, then OK"
        findings.add("stream lost responses", "", cases[len(responses)], lost)
    if code != grpc.StatusCode.OK:
        # the stream ended early: the request it stopped at answers with its status
        findings.judge(cases[min(len(responses), len(cases) - 1)], code, details, None)


def test_server_healthy_afterwards(fuzzed: Fuzzed) -> None:
    """Runs last: after every phase, the server serves, within its memory, threads and log."""
    require_alive(fuzzed)
    for model in MODELS:
        check_serves(fuzzed.server, model)
    start = fuzzed.start
    deadline = time.monotonic() + 5  # stream threads wind down after their stream ends
    while True:
        now = proc_status(fuzzed.server.proc.pid)
        if now["Threads"] <= start["Threads"] + MAX_THREAD_GROWTH or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    log = fuzzed.server.log()
    tracebacks = log.count("Traceback")
    problems = []
    if now["VmRSS"] > start["VmRSS"] + MAX_RSS_GROWTH:
        problems.append(
            f"RSS grew from {start['VmRSS'] >> 20} MB to {now['VmRSS'] >> 20} MB "
            f"(peak {fuzzed.peak >> 20} MB)"
        )
    if now["Threads"] > start["Threads"] + MAX_THREAD_GROWTH:
        problems.append(f"threads grew from {start['Threads']} to {now['Threads']}")
    if tracebacks > MAX_TRACEBACKS:
        first = log[log.index("Traceback") :][:1500]
        problems.append(f"{tracebacks} tracebacks in the server log; the first:\n{first}")
    print(
        f"server after fuzzing: RSS {start['VmRSS'] >> 20} -> {now['VmRSS'] >> 20} MB, peak "
        f"{fuzzed.peak >> 20} MB, threads {start['Threads']} -> {now['Threads']}, "
        f"{tracebacks} tracebacks, log {len(log) >> 10} KiB, address space "
        f"{start['VmSize'] >> 20} -> {now['VmSize'] >> 20} MB "
        f"(capped at +{ADDRESS_SPACE_HEADROOM >> 20} MB)"
    )
    try:
        if (code := fuzzed.server.stop(timeout=15)) != 0:
            problems.append(f"the server exited with status {code} on SIGTERM")
    except subprocess.TimeoutExpired:
        problems.append("the server did not exit within 15 s of SIGTERM (it was killed)")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
