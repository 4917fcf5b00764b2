"""The triton passthrough backend: a Tiffin server proxying to a second one on loopback,
driven by tritonclient; TLS through a TLS-terminating gRPC hop with certificates made here."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from conftest import ONNX_EXAMPLES, ServerProcess, example_models, free_port
from models import value_input, write_repository
from tiffin.backends.triton import TritonBackend
from tiffin.protos.model_config import ModelConfig

RNG = np.random.default_rng(7)

TOY = """
backend: toy_backends:{backend}
max_batch_size: 8
inputs: [{{name: INPUT0, datatype: FP32, dims: [1]}}]
outputs: [{{name: OUTPUT0, datatype: FP32, dims: [1]}}]
instance_group: [{{kind: {kind}}}]
"""


def proxy_config(url: str, remote: str, extra: str = "", **parameters: object) -> str:
    lines = "".join(f"\n  {k}: {v}" for k, v in parameters.items())
    return f"backend: triton\n{extra}\nparameters:\n  url: '{url}'\n  model_name: {remote}{lines}\n"


def add_sub_inputs(a: np.ndarray, b: np.ndarray) -> list[tc.InferInput]:
    tensors = []
    for name, array in (("INPUT0", a), ("INPUT1", b)):
        tensor = tc.InferInput(name, list(array.shape), "INT32")
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def repository_state(client: tc.InferenceServerClient) -> dict[str, tuple[str, str]]:
    return {m.name: (m.state, m.reason) for m in client.get_model_repository_index().models}


# ---- servers: a remote with the examples and toy models, and TLS in front of it ----------


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # The example ONNX models are the ones proxied: the torch and python workers stay out.
    root = example_models(tmp_path_factory.mktemp("remote") / "models", *ONNX_EXAMPLES)
    write_repository(
        root,
        {
            "echo": TOY.format(backend="Echo", kind="inline"),
            "fail": TOY.format(backend="Fail", kind="inline"),
            "slow": TOY.format(backend="Slow", kind="cpu"),
        },
    )
    server = ServerProcess(root)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A self-signed certificate for the name tiffin.test (not the address dialled), used by
    the TLS hop as its server certificate and CA, and by the proxy as its client one."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=tiffin.test",
         "-addext", "subjectAltName=DNS:tiffin.test"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return {"key": key, "cert": cert}


class TlsHop:
    """A TLS gRPC server on loopback (client certificates required) that passes every unary
    call on, bytes unchanged, to a plaintext server: TLS in front of a Tiffin server."""

    def __init__(self, target: str, key: Path, cert: Path) -> None:
        self._channel = grpc.insecure_channel(target)
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        self._server.add_generic_rpc_handlers([self._Handler(self._channel)])
        credentials = grpc.ssl_server_credentials(
            [(key.read_bytes(), cert.read_bytes())],
            root_certificates=cert.read_bytes(),
            require_client_auth=True,
        )
        self._server.add_secure_port(self.url, credentials)
        self._server.start()

    class _Handler(grpc.GenericRpcHandler):
        def __init__(self, channel: grpc.Channel) -> None:
            self._channel = channel

        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
            call = self._channel.unary_unary(details.method)  # bytes in, bytes out

            def forward(request: bytes, context: grpc.ServicerContext) -> bytes:
                try:
                    return call(request, timeout=context.time_remaining())
                except grpc.RpcError as exc:
                    context.abort(exc.code(), exc.details())

            return grpc.unary_unary_rpc_method_handler(forward)

    def stop(self) -> None:
        self._server.stop(0).wait()
        self._channel.close()


@pytest.fixture(scope="module")
def tls_hop(remote: ServerProcess, certificates: dict[str, Path]) -> Iterator[TlsHop]:
    hop = TlsHop(remote.url, certificates["key"], certificates["cert"])
    yield hop
    hop.stop()


@pytest.fixture(scope="module")
def proxy(
    remote: ServerProcess,
    tls_hop: TlsHop,
    certificates: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProcess]:
    nobody = f"127.0.0.1:{free_port()}"  # nothing listens there
    tls = {
        "ssl": "true",
        "root_certificates": str(certificates["cert"]),
        "private_key": str(certificates["key"]),
        "certificate_chain": str(certificates["cert"]),
        "ssl_target_name_override": "tiffin.test",
    }
    url = remote.url
    root = write_repository(
        tmp_path_factory.mktemp("proxy") / "models",
        {
            "add_sub": proxy_config(url, "add_sub"),
            "classifier_v1": proxy_config(url, "classifier", model_version="'1'"),
            "classifier": proxy_config(url, "classifier"),
            "uppercase": proxy_config(url, "uppercase"),
            "echo": proxy_config(
                url,
                "echo",
                "max_batch_size: 4\noutputs: [{name: OUTPUT0, datatype: FP32, dims: [1]}]",
            ),
            "fail": proxy_config(url, "fail"),
            "slow": proxy_config(url, "slow"),
            "slow_capped": proxy_config(url, "slow", timeout_seconds=0.3),
            "secure_echo": proxy_config(tls_hop.url, "echo", **tls),
            "untrusting": proxy_config(tls_hop.url, "echo", ssl="true"),
            "nowhere": proxy_config(nobody, "echo"),
            "wrong_type": proxy_config(
                url, "echo", "inputs: [{name: INPUT0, datatype: INT32, dims: [1]}]"
            ),
            "too_big": proxy_config(url, "echo", "max_batch_size: 16"),
            "misspelt": proxy_config(url, "echo", timeout_secs=1),
        },
    )
    server = ServerProcess(root)
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture
def client(proxy: ServerProcess) -> tc.InferenceServerClient:
    return tc.InferenceServerClient(proxy.url)


@pytest.fixture
def remote_client(remote: ServerProcess) -> tc.InferenceServerClient:
    return tc.InferenceServerClient(remote.url)


# ---- answers, config and metadata -------------------------------------------------------


def test_answers_equal_the_remote_and_numpy(client, remote_client):
    a = RNG.integers(-1000, 1000, (3, 16), dtype=np.int32)
    b = RNG.integers(-1000, 1000, (3, 16), dtype=np.int32)
    result = client.infer("add_sub", add_sub_inputs(a, b))
    assert result.as_numpy("OUTPUT0").tolist() == (a + b).tolist()
    assert result.as_numpy("OUTPUT1").tolist() == (a - b).tolist()
    features = RNG.standard_normal((5, 4)).astype(np.float32)
    tensor = tc.InferInput("features", [5, 4], "FP32")
    tensor.set_data_from_numpy(features)
    for proxy_model, version in (("classifier", ""), ("classifier_v1", "1")):
        proxied = client.infer(proxy_model, [tensor]).as_numpy("probabilities")
        direct = remote_client.infer("classifier", [tensor], model_version=version)
        assert np.array_equal(proxied, direct.as_numpy("probabilities"))
    # Versions 1 and 2 of the remote classifier differ: each proxy reached its own.
    v1 = client.infer("classifier_v1", [tensor]).as_numpy("probabilities")
    assert not np.array_equal(v1, client.infer("classifier", [tensor]).as_numpy("probabilities"))
    words = np.array([b"tiffin", b"proxy"], dtype=np.object_)
    text = tc.InferInput("text", [2], "BYTES")
    text.set_data_from_numpy(words)
    upper = remote_client.get_model_metadata("uppercase")
    out_name = upper.outputs[0].name
    text = tc.InferInput(upper.inputs[0].name, [2], "BYTES")
    text.set_data_from_numpy(words)
    assert client.infer("uppercase", [text]).as_numpy(out_name).tolist() == [b"TIFFIN", b"PROXY"]


def test_metadata_and_config_are_completed_from_the_remote(client, remote_client):
    for proxy_model, remote_model in (
        ("add_sub", "add_sub"),
        ("classifier", "classifier"),
        ("uppercase", "uppercase"),
    ):
        mine, theirs = (
            client.get_model_metadata(proxy_model),
            remote_client.get_model_metadata(remote_model),
        )
        for kind in ("inputs", "outputs"):
            assert [(t.name, t.datatype, list(t.shape)) for t in getattr(mine, kind)] == [
                (t.name, t.datatype, list(t.shape)) for t in getattr(theirs, kind)
            ]
        assert mine.platform == theirs.platform
        config = client.get_model_config(proxy_model).config
        remote_config = remote_client.get_model_config(remote_model).config
        assert config.backend == "triton"
        assert config.max_batch_size == remote_config.max_batch_size
        assert config.parameters["url"].string_value
    # A declared max_batch_size within the remote's, and a declared subset of the outputs.
    echo = client.get_model_config("echo").config
    assert echo.max_batch_size == 4 and [i.name for i in echo.input] == ["INPUT0"]
    with pytest.raises(InferenceServerException) as info:
        client.infer("echo", [value_input(*range(5))])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"  # the proxy's own check
    assert "batch-size must be <= 4" in info.value.message()


def test_bad_configs_and_unreachable_remotes_make_only_that_model_unavailable(client, proxy):
    states = repository_state(client)
    assert states["add_sub"][0] == "READY"
    state, reason = states["nowhere"]
    assert state == "UNAVAILABLE"
    nowhere_url = reason.split("remote server ")[1].split(" ")[0]
    assert "is not reachable: UNAVAILABLE" in reason and nowhere_url.startswith("127.0.0.1:")
    state, reason = states["wrong_type"]
    assert state == "UNAVAILABLE"
    assert "inputs: 'INPUT0' is declared INT32 but the remote model" in reason and "FP32" in reason
    state, reason = states["too_big"]
    assert state == "UNAVAILABLE" and "max_batch_size is 16" in reason and "1..8" in reason
    state, reason = states["misspelt"]
    assert state == "UNAVAILABLE" and "timeout_secs" in reason and "timeout_seconds" in reason
    with pytest.raises(InferenceServerException) as info:
        client.infer("nowhere", [value_input(1.0)])
    assert "'nowhere' has no available versions" in info.value.message()


# ---- errors -----------------------------------------------------------------------------


def test_remote_errors_reach_the_caller_with_the_remotes_code_and_message(client, remote_client):
    with pytest.raises(InferenceServerException) as direct:
        remote_client.infer("fail", [value_input(-1.0)])
    with pytest.raises(InferenceServerException) as proxied:
        client.infer("fail", [value_input(-1.0)])
    assert proxied.value.status() == direct.value.status() == "StatusCode.INTERNAL"
    assert proxied.value.message() == direct.value.message()
    assert "negative input is not allowed" in proxied.value.message()
    assert client.infer("fail", [value_input(2.0)]).as_numpy("OUTPUT0").tolist() == [[2.0]]


def test_deadlines_caller_and_timeout_seconds(client):
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as info:
        client.infer("slow", [value_input(1.0)], client_timeout=0.3)
    assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    with pytest.raises(InferenceServerException) as info:
        client.infer("slow_capped", [value_input(1.0)], client_timeout=10)
    assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert "timeout_seconds (0.3 s)" in info.value.message()
    assert time.monotonic() - started < 2.5
    assert client.infer("slow", [value_input(0.0)]).as_numpy("OUTPUT0").tolist() == [[0.0]]


def remote_executions(remote_client: tc.InferenceServerClient, model: str) -> int:
    return remote_client.get_inference_statistics(model, "1").model_stats[0].execution_count


def test_cancelled_or_expired_callers_are_dropped_from_the_remote_queue(client, remote_client):
    """The forwarded call carries the caller's deadline and is cancelled with its caller,
    so the remote drops it from its queue instead of computing it."""
    before = remote_executions(remote_client, "slow")
    blocker = threading.Thread(target=remote_client.infer, args=("slow", [value_input(0.8)]))
    blocker.start()
    time.sleep(0.15)
    context = client.async_infer("slow", [value_input(0.0)], lambda result, error: None)
    with pytest.raises(InferenceServerException) as info:
        client.infer("slow", [value_input(0.0)], client_timeout=0.2)
    # The remote refuses it at once when its measured batch time says the deadline cannot
    # be met (RESOURCE_EXHAUSTED), else drops it from its queue at the deadline.
    assert info.value.status() in ("StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED")
    context.cancel()
    blocker.join(30)
    time.sleep(0.3)
    assert remote_executions(remote_client, "slow") == before + 1  # only the blocker ran


def test_unload_lets_forwarded_requests_finish(client):
    call = threading.Thread(target=lambda: outcome.append(client.infer("slow", [value_input(0.6)])))
    outcome: list = []
    call.start()
    time.sleep(0.2)
    started = time.monotonic()
    client.unload_model("slow")  # returns once the request in flight has finished
    # The 0.6 s request had ~0.4 s left: unload waited for it (its answer may still be on
    # the wire to the client thread, so join that rather than read it at once).
    assert time.monotonic() - started > 0.3
    call.join(5)
    assert outcome and outcome[0].as_numpy("OUTPUT0").tolist() == [[pytest.approx(0.6)]]
    assert repository_state(client)["slow"][0] == "UNAVAILABLE"
    client.load_model("slow")
    assert client.infer("slow", [value_input(0.0)]).as_numpy("OUTPUT0").tolist() == [[0.0]]


def test_remote_changed_or_down_after_load(make_server, tmp_path):
    """The remote's own validation answers through the proxy with its code and message;
    a remote that goes away answers UNAVAILABLE naming it, and other models keep serving."""
    echo = TOY.format(backend="Echo", kind="inline")
    changing_repo = write_repository(tmp_path / "changing", {"echo": echo})
    changing = make_server(changing_repo)
    survivor = make_server(write_repository(tmp_path / "survivor", {"echo": echo}))
    proxy = make_server(
        write_repository(
            tmp_path / "proxy",
            {
                "changing": proxy_config(changing.url, "echo"),
                "other": proxy_config(survivor.url, "echo"),
            },
        )
    )
    client = tc.InferenceServerClient(proxy.url)
    assert client.infer("changing", [value_input(1.0)]).as_numpy("OUTPUT0").tolist() == [[1.0]]
    # The remote model now takes INT32: the proxy (still FP32) cannot know, the remote can.
    (changing_repo / "echo" / "config.yaml").write_text(echo.replace("FP32", "INT32"))
    tc.InferenceServerClient(changing.url).load_model("echo")
    with pytest.raises(InferenceServerException) as info:
        client.infer("changing", [value_input(1.0)])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert info.value.message() == (
        "inference input 'INPUT0' data-type is 'FP32', but model 'echo' expects 'INT32'"
    )
    changing.stop()
    with pytest.raises(InferenceServerException) as info:
        client.infer("changing", [value_input(1.0)], client_timeout=10)
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    assert f"remote server {changing.url} is unavailable" in info.value.message()
    assert client.infer("other", [value_input(3.0)]).as_numpy("OUTPUT0").tolist() == [[3.0]]


# ---- streaming, TLS, load ----------------------------------------------------------------


def test_streaming_through_the_proxy_answers_in_order(client):
    answers: list = []
    done = threading.Event()
    count = 40

    def callback(result, error) -> None:
        answers.append((result, error))
        if len(answers) == count:
            done.set()

    client.start_stream(callback)
    try:
        for i in range(count):
            model = "fail" if i % 10 == 9 else "echo"
            value = -1.0 if model == "fail" else float(i)
            client.async_stream_infer(model, [value_input(value)], request_id=str(i))
        assert done.wait(30)
    finally:
        client.stop_stream()
    for i, (result, error) in enumerate(answers):
        if i % 10 == 9:
            assert result is None and "negative input is not allowed" in error.message()
        else:
            assert error is None
            assert result.get_response().id == str(i)
            assert result.as_numpy("OUTPUT0").tolist() == [[float(i)]]


def test_tls_with_client_certificates(client):
    values = RNG.standard_normal(3).astype(np.float32)
    result = client.infer("secure_echo", [value_input(*values)])
    assert result.as_numpy("OUTPUT0").reshape(-1).tolist() == values.tolist()
    config = client.get_model_config("secure_echo").config
    assert [o.name for o in config.output] == ["OUTPUT0"]
    # Without the test CA, the remote's certificate is not trusted: unreachable, with why.
    state, reason = repository_state(client)["untrusting"]
    assert state == "UNAVAILABLE" and "is not reachable: UNAVAILABLE" in reason
    assert "CERTIFICATE_VERIFY_FAILED" in reason


def test_32_concurrent_clients(proxy):
    clients, per_client = 32, 50
    errors: list[str] = []
    served = [0] * clients
    stats_client = tc.InferenceServerClient(proxy.url)
    before = stats_client.get_inference_statistics("add_sub", "1").model_stats[0].inference_stats

    def run(index: int) -> None:
        rng = np.random.default_rng(index)
        client = tc.InferenceServerClient(proxy.url)
        try:
            for _ in range(per_client):
                rows = int(rng.integers(1, 5))
                a = rng.integers(-1000, 1000, (rows, 16), dtype=np.int32)
                b = rng.integers(-1000, 1000, (rows, 16), dtype=np.int32)
                result = client.infer("add_sub", add_sub_inputs(a, b), client_timeout=30)
                if not (
                    np.array_equal(result.as_numpy("OUTPUT0"), a + b)
                    and np.array_equal(result.as_numpy("OUTPUT1"), a - b)
                ):
                    errors.append(f"client {index}: wrong answer")
                served[index] += 1
        except InferenceServerException as exc:
            errors.append(f"client {index}: {exc}")
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert sum(served) == clients * per_client
    after = stats_client.get_inference_statistics("add_sub", "1").model_stats[0].inference_stats
    assert after.fail.count == before.fail.count
    assert after.success.count - before.success.count == clients * per_client
    assert after.compute_infer.count - before.compute_infer.count == clients * per_client


# ---- parameters, without servers -------------------------------------------------------


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({}, "parameters.url is required"),
        ({"url": "localhost"}, "parameters.url must be host:port"),
        ({"url": "h:1", "timeout_seconds": "soon"}, "parameters.timeout_seconds must be"),
        ({"url": "h:1", "timeout_seconds": -1}, "parameters.timeout_seconds must be >= 0"),
        ({"url": "h:1", "ssl": "maybe"}, "parameters.ssl must be true or false"),
        ({"url": "h:1", "root_certificates": "/x"}, "root_certificates need parameters.ssl"),
        ({"url": "h:1", "ssl": True, "private_key": "/x"}, "private_key needs parameters."),
        ({"url": "h:1", "ssl": True, "root_certificates": "/nope"}, "root_certificates: /nope"),
        ({"url": "h:1", "max_message_bytes": 10}, "parameters.max_message_bytes must be"),
        ({"url": "h:1", "urll": "x"}, "parameters urll are unknown to the triton backend"),
    ],
)
def test_parameters_are_validated_naming_the_parameter(tmp_path, parameters, message):
    config = ModelConfig(name="proxy", backend="triton", parameters=parameters)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        TritonBackend.complete_config(config, tmp_path)
