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
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest

from conftest import ServerProcess
from fuzz_cases import (
    CALL_TIMEOUT,
    FP32,
    MODELS,
    Case,
    Model,
    base_request,
    byte_case,
    named_cases,
    structured_case,
)
from models import identity, write_model
from tiffin.protos import MESSAGE_SIZE_OPTIONS, method_path, protocol

pb = protocol()

SEED = 20250607
UNARY_CASES = 8000
BYTE_CASES = 4000
# Per stream flavour: (streams, requests per stream). A stream that turns errors into its
# status ends at the first one, so that flavour sends more, shorter streams.
STREAMS = {"in-band": (40, 25), "abort-on-error": (200, 4), "byte-level": (40, 25)}

STREAM_TIMEOUT = 15.0
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

# Room for whatever status message the server sends: with gRPC's default 8 KiB limit on
# metadata, a 1 MB message reaches the client as RESOURCE_EXHAUSTED and would pass unseen.
CHANNEL_OPTIONS = [*MESSAGE_SIZE_OPTIONS, ("grpc.max_metadata_size", 16 << 20)]


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
