"""Security against real servers: TLS and mutual TLS with tritonclient (gRPC and HTTP),
certificate rotation under load, each role against each call kind on both front doors,
JWTs, the audit log's exact lines, limits per client, and the model control modes."""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import jwt
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from certificates import Authority, Issued
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tritonclient.utils import InferenceServerException

from models import ECHO, write_repository
from tiffin.server.security import token_digest

SLOW = ECHO.replace("toy_backends:Echo", "toy_backends:Slow")
# Tokens as `serverctl token` makes them: random, 32 bytes.
TOKENS = {
    "alice": "tk_alice_" + "a1" * 16,
    "reader": "tk_reader_" + "b2" * 16,
    "ops": "tk_ops_" + "c3" * 16,
}
# Test servers are started in explicit mode by conftest; these start as a user would.
DEFAULT_MODE = {"TIFFIN_MODEL_CONTROL_MODE": "none", "TIFFIN_LOAD_MODEL": ""}


def token_file(folder: Path, extra: list[dict[str, Any]] | None = None) -> Path:
    principals = [
        {"name": "alice", "roles": ["infer"], "models": ["echo"]},
        {"name": "reader", "roles": ["read"]},
        {"name": "ops", "roles": ["admin", "read"]},
    ]
    for entry in principals:
        entry["token_sha256"] = token_digest(TOKENS[entry["name"]])
    path = folder / "tokens.yaml"
    path.write_text(yaml.safe_dump({"principals": principals + (extra or [])}))
    return path


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return write_repository(tmp_path / "repo", {"echo": ECHO, "other": ECHO, "slow": SLOW})


def bearer(name: str | None) -> dict[str, str]:
    if name is None:
        return {}
    return {"authorization": f"Bearer {TOKENS.get(name, 'tk_not_a_known_token_000000')}"}


def one_input(client_module: Any, value: float = 1.0) -> list[Any]:
    tensor = client_module.InferInput("INPUT0", [1, 2], "FP32")
    tensor.set_data_from_numpy(np.full((1, 2), value, np.float32))
    return [tensor]


# ---- each role against each call kind ------------------------------------------------------

# call -> (gRPC way, REST method and path)
CALLS = {
    "live": (lambda c, h: c.is_server_live(headers=h), "GET", "/v2/health/live"),
    "metadata echo": (
        lambda c, h: c.get_model_metadata("echo", headers=h),
        "GET",
        "/v2/models/echo",
    ),
    "metadata other": (
        lambda c, h: c.get_model_metadata("other", headers=h),
        "GET",
        "/v2/models/other",
    ),
    "config echo": (
        lambda c, h: c.get_model_config("echo", headers=h),
        "GET",
        "/v2/models/echo/config",
    ),
    "statistics": (
        lambda c, h: c.get_inference_statistics(headers=h),
        "GET",
        "/v2/models/stats",
    ),
    "index": (
        lambda c, h: c.get_model_repository_index(headers=h),
        "POST",
        "/v2/repository/index",
    ),
    "infer echo": (
        lambda c, h: c.infer("echo", one_input(grpcclient), headers=h),
        "POST",
        "/v2/models/echo/infer",
    ),
    "infer other": (
        lambda c, h: c.infer("other", one_input(grpcclient), headers=h),
        "POST",
        "/v2/models/other/infer",
    ),
    "load echo": (
        lambda c, h: c.load_model("echo", headers=h),
        "POST",
        "/v2/repository/models/echo/load",
    ),
}
OK, UNAUTH, DENIED = "OK", "UNAUTHENTICATED", "PERMISSION_DENIED"
# principal (None: no credentials; "stranger": a token nobody has) -> expected per call
EXPECTED = {
    None: {"live": OK} | {c: UNAUTH for c in CALLS if c != "live"},
    "stranger": {"live": OK} | {c: UNAUTH for c in CALLS if c != "live"},
    "alice": {
        "live": OK,
        "metadata echo": OK,
        "metadata other": DENIED,
        "config echo": OK,
        "statistics": DENIED,
        "index": DENIED,
        "infer echo": OK,
        "infer other": DENIED,
        "load echo": DENIED,
    },
    "reader": {c: OK for c in CALLS}
    | {"infer echo": DENIED, "infer other": DENIED, "load echo": DENIED},
    "ops": {c: OK for c in CALLS} | {"infer echo": DENIED, "infer other": DENIED},
}
HTTP_CODES = {OK: 200, UNAUTH: 401, DENIED: 403}
INFER_BODY = json.dumps(
    {"inputs": [{"name": "INPUT0", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
)


def grpc_outcome(call: Any, client: grpcclient.InferenceServerClient, headers: dict) -> str:
    try:
        call(client, headers)
        return OK
    except InferenceServerException as exc:
        return str(exc.status()).removeprefix("StatusCode.")


def rest_request(
    address: str, method: str, path: str, headers: dict, body: str | None = None, tls: Any = None
) -> tuple[int, dict[str, str], bytes]:
    host, port = address.rsplit(":", 1)
    connection: http.client.HTTPConnection = (
        http.client.HTTPSConnection(host, int(port), context=tls, timeout=30)
        if tls is not None
        else http.client.HTTPConnection(host, int(port), timeout=30)
    )
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_each_role_against_each_call(make_server, repo: Path, tmp_path: Path) -> None:
    tokens = token_file(tmp_path)
    server = make_server(repo, "--auth-token-file", str(tokens), env=DEFAULT_MODE)
    client = grpcclient.InferenceServerClient(server.url)
    table = []
    for principal, expected in EXPECTED.items():
        for call, (grpc_call, method, path) in CALLS.items():
            headers = bearer(principal)
            got_grpc = grpc_outcome(grpc_call, client, headers)
            body = INFER_BODY if path.endswith("/infer") else ("{}" if method == "POST" else None)
            status, reply_headers, reply = rest_request(
                server.http_url, method, path, headers, body
            )
            table.append((principal, call, expected[call], got_grpc, status))
            if status == 401:
                assert reply_headers.get("WWW-Authenticate") == "Bearer"
            token = TOKENS.get(str(principal), "")
            assert not token or token.encode() not in reply, "a token was echoed"
    wrong = [row for row in table if row[2] != row[3] or HTTP_CODES[row[2]] != row[4]]
    assert not wrong, "(principal, call, expected, gRPC, HTTP):\n" + "\n".join(map(str, wrong))
    assert not any(t in server.log() for t in TOKENS.values()), "a token reached the log"


def test_refusals_say_what_is_needed(make_server, repo: Path, tmp_path: Path) -> None:
    server = make_server(repo, "--auth-token-file", str(token_file(tmp_path)), env=DEFAULT_MODE)
    client = grpcclient.InferenceServerClient(server.url)
    with pytest.raises(InferenceServerException) as denied:
        client.load_model("echo", headers=bearer("reader"))
    assert "needs the 'admin' role, which 'reader' lacks" in denied.value.message()
    with pytest.raises(InferenceServerException) as limited:
        client.infer("other", one_input(grpcclient), headers=bearer("alice"))
    assert "'alice' may not use model 'other'" in limited.value.message()
    with pytest.raises(InferenceServerException) as missing:
        client.get_model_metadata("echo")
    assert "send 'authorization: Bearer <token>'" in missing.value.message()
    # Refusals are counted, though they never reach the metrics interceptor.
    import urllib.request

    scrape = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    for reason, count in (("unauthenticated", 1), ("permission_denied", 2)):
        line = f'tiffin_requests_refused_total{{protocol="grpc",reason="{reason}"}} {count}'
        assert line in scrape, scrape[-2000:]
    # The health service stays open for probes.
    with grpc.insecure_channel(server.url) as channel:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


# ---- the audit log -------------------------------------------------------------------------


def test_audit_log_holds_exactly_the_session(make_server, repo: Path, tmp_path: Path) -> None:
    audit = tmp_path / "audit" / "audit.log"
    server = make_server(
        repo,
        *("--auth-token-file", str(token_file(tmp_path)), "--audit-log", str(audit)),
        env=DEFAULT_MODE,
    )
    client = grpcclient.InferenceServerClient(server.url)
    client.load_model("echo", headers=bearer("ops"))
    client.unload_model("other", headers=bearer("ops"))
    client.infer("echo", one_input(grpcclient), headers=bearer("alice"))  # not audited
    for refused in (
        lambda: client.unload_model("echo", headers=bearer("reader")),
        lambda: client.get_model_metadata("echo"),
        lambda: client.infer("echo", one_input(grpcclient), headers=bearer("stranger")),
        lambda: client.load_model("no_such_model", headers=bearer("ops")),
    ):
        with pytest.raises(InferenceServerException):
            refused()
    rest_request(
        server.http_url, "POST", "/v2/repository/models/echo/unload", bearer("alice"), "{}"
    )
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [
        (r["principal"], r["front_door"], r["call"], r["model"], r["outcome"]) for r in lines
    ] == [
        ("ops", "grpc", "load", "echo", "ok"),
        ("ops", "grpc", "unload", "other", "ok"),
        ("reader", "grpc", "unload", "echo", "refused"),
        ("", "grpc", "model_metadata", "echo", "refused"),
        ("", "grpc", "infer", "echo", "refused"),
        ("ops", "grpc", "load", "no_such_model", "failed"),
        ("alice", "rest", "unload", "echo", "refused"),
    ]
    for line in lines:
        assert set(line) == {
            "time", "principal", "peer", "front_door", "call", "model", "version", "outcome",
            "reason",
        }  # fmt: skip
        assert line["peer"].startswith("127.0.0.1:")
        assert line["outcome"] == "ok" or line["reason"]
    text = audit.read_text()
    assert not any(token in text for token in TOKENS.values())
    assert "tk_not_a_known_token" not in text
    assert oct(audit.stat().st_mode & 0o777) == "0o600"


def test_audit_log_rotates_by_size(make_server, repo: Path, tmp_path: Path) -> None:
    audit = tmp_path / "audit.log"
    server = make_server(
        repo,
        *("--auth-token-file", str(token_file(tmp_path)), "--audit-log", str(audit)),
        *("--audit-log-max-bytes", "4096", "--audit-log-backups", "2"),
        env=DEFAULT_MODE,
    )
    for _ in range(60):  # some 300 bytes each: four files' worth
        rest_request(server.http_url, "GET", "/v2/models/echo", {})
    kept = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("audit.log"))
    assert kept == ["audit.log", "audit.log.1", "audit.log.2"]
    for path in tmp_path.glob("audit.log*"):
        assert path.stat().st_size <= 4096
        for line in path.read_text().splitlines():
            json.loads(line)  # whole lines only


# ---- model control modes -------------------------------------------------------------------


def test_load_and_unload_are_off_by_default(make_server, repo: Path) -> None:
    server = make_server(repo, env=DEFAULT_MODE)
    client = grpcclient.InferenceServerClient(server.url)
    assert client.is_model_ready("echo") and client.is_model_ready("other")
    for call in (client.load_model, client.unload_model):
        with pytest.raises(InferenceServerException) as refused:
            call("echo")
        assert refused.value.status() == "StatusCode.FAILED_PRECONDITION"
        assert "--model-control-mode explicit" in refused.value.message()
    status, _, reply = rest_request(
        server.http_url, "POST", "/v2/repository/models/echo/unload", {}, "{}"
    )
    assert status == 400 and b"model control mode 'none'" in reply
    assert client.is_model_ready("echo")


def test_explicit_mode_loads_what_is_named(make_server, repo: Path) -> None:
    server = make_server(
        repo,
        *("--model-control-mode", "explicit", "--load-model", "echo"),
        env=DEFAULT_MODE,
    )
    client = grpcclient.InferenceServerClient(server.url)
    assert client.is_model_ready("echo")
    with pytest.raises(InferenceServerException):
        client.is_model_ready("other")  # never loaded: unknown, as in Triton
    client.load_model("other")
    assert client.is_model_ready("other")
    client.unload_model("echo")
    assert not client.is_model_ready("echo")


def test_load_model_names_must_exist(tmp_path: Path, repo: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "tiffin.server.cli", "serve", "--model-repository", str(repo)]
        + ["--grpc-port", "0", "--http-port", "0", "--metrics-port", "0"]
        + ["--model-control-mode", "explicit", "--load-model", "missing"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TIFFIN_ALLOWED_BACKENDS": "toy_backends"},
    )
    assert result.returncode == 1
    assert "--load-model names 'missing', which the repository does not hold" in result.stderr


# ---- TLS and mutual TLS --------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    ca = Authority(tmp_path / "pki")
    stranger_ca = Authority(tmp_path / "other-pki", "Someone else's CA")
    return {
        "ca": ca,
        "server": ca.issue("server", "localhost", server=True),
        "alice": ca.issue("alice", "alice", server=False),
        "unknown": ca.issue("unknown", "unknown", server=False),
        "untrusted": stranger_ca.issue("untrusted", "alice", server=False),
    }


def tls_flags(pki: dict[str, Any], mutual: bool) -> list[str]:
    server: Issued = pki["server"]
    flags = ["--grpc-server-cert", str(server.cert), "--grpc-server-key", str(server.key)]
    flags += ["--grpc-root-cert", str(pki["ca"].cert)]
    if mutual:
        return flags + ["--grpc-use-ssl-mutual", "--http-use-ssl-mutual"]
    return flags + ["--grpc-use-ssl", "--http-use-ssl"]


def grpc_tls_client(url: str, pki: dict[str, Any], who: str | None) -> Any:
    kwargs: dict[str, Any] = {"ssl": True, "root_certificates": str(pki["ca"].cert)}
    if who is not None:
        kwargs |= {"private_key": str(pki[who].key), "certificate_chain": str(pki[who].cert)}
    return grpcclient.InferenceServerClient(url, **kwargs)


def https_context(pki: dict[str, Any], who: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki["ca"].cert))
    if who is not None:
        context.load_cert_chain(str(pki[who].cert), str(pki[who].key))
    return context


def test_tls_with_tritonclient(make_server, repo: Path, pki: dict[str, Any]) -> None:
    credentials = grpc.ssl_channel_credentials(pki["ca"].cert.read_bytes())
    server = make_server(repo, *tls_flags(pki, mutual=False), credentials=credentials)
    result = grpc_tls_client(server.url, pki, None).infer("echo", one_input(grpcclient, 3.0))
    assert result.as_numpy("OUTPUT0").tolist() == [[3.0, 3.0]]
    https = httpclient.InferenceServerClient(
        server.http_url, ssl=True, ssl_context_factory=lambda: https_context(pki, None)
    )
    assert https.infer("echo", one_input(httpclient, 4.0)).as_numpy("OUTPUT0").tolist() == [
        [4.0, 4.0]
    ]
    # Plain text is not served on a TLS port.
    with pytest.raises(InferenceServerException):
        grpcclient.InferenceServerClient(server.url).is_server_live(client_timeout=5)
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
        rest_request(server.http_url, "GET", "/v2/health/live", {})


def test_mutual_tls_refuses_missing_and_untrusted_certificates(
    make_server, repo: Path, pki: dict[str, Any], tmp_path: Path
) -> None:
    tokens = token_file(
        tmp_path,
        [
            {
                "name": "alice-cert",
                "roles": ["infer"],
                "certificate_subject": "CN=alice,O=Tiffin tests",
            }
        ],
    )
    credentials = grpc.ssl_channel_credentials(pki["ca"].cert.read_bytes(), *pki["alice"].pair)
    server = make_server(
        repo,
        *tls_flags(pki, mutual=True),
        *("--auth-token-file", str(tokens), "--auth-certificate-principals"),
        credentials=credentials,
    )
    # A known certificate is a principal: no token needed, on either front door.
    alice = grpc_tls_client(server.url, pki, "alice")
    assert alice.infer("echo", one_input(grpcclient)).as_numpy("OUTPUT0") is not None
    status, _, _ = rest_request(
        server.http_url,
        "POST",
        "/v2/models/echo/infer",
        {},
        INFER_BODY,
        https_context(pki, "alice"),
    )
    assert status == 200
    # A trusted certificate that names no principal, and no token: UNAUTHENTICATED.
    with pytest.raises(InferenceServerException) as unknown:
        grpc_tls_client(server.url, pki, "unknown").infer("echo", one_input(grpcclient))
    assert unknown.value.status() == "StatusCode.UNAUTHENTICATED"
    assert "CN=unknown,O=Tiffin tests" in unknown.value.message()
    # ... but its token still works.
    reader = grpc_tls_client(server.url, pki, "unknown")
    assert reader.get_model_metadata("other", headers=bearer("reader"))
    # No certificate, or one from another authority: the handshake fails.
    for who in (None, "untrusted"):
        with pytest.raises(InferenceServerException) as refused:
            grpc_tls_client(server.url, pki, who).is_server_live(client_timeout=5)
        assert refused.value.status() in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            rest_request(
                server.http_url, "GET", "/v2/health/live", {}, None, https_context(pki, who)
            )


def served_certificate(address: str, alpn: str) -> bytes:
    """The DER certificate a new TLS connection to `address` is shown."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols([alpn])
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return der


def test_certificate_rotation_drops_no_call(make_server, repo: Path, pki: dict[str, Any]) -> None:
    credentials = grpc.ssl_channel_credentials(pki["ca"].cert.read_bytes())
    server = make_server(repo, *tls_flags(pki, mutual=False), credentials=credentials)
    before = {door: served_certificate(a, alpn) for door, a, alpn in _doors(server)}
    counts = {"grpc": 0, "rest": 0, "failed": 0}
    failures: list[str] = []
    stop = threading.Event()

    def keep_calling_grpc() -> None:
        client = grpc_tls_client(server.url, pki, None)  # one connection throughout
        while not stop.is_set():
            try:
                client.infer("echo", one_input(grpcclient))
                counts["grpc"] += 1
            except InferenceServerException as exc:
                counts["failed"] += 1
                failures.append(str(exc))

    def keep_calling_rest() -> None:
        client = httpclient.InferenceServerClient(
            server.http_url, ssl=True, ssl_context_factory=lambda: https_context(pki, None)
        )
        while not stop.is_set():
            try:
                client.infer("echo", one_input(httpclient))
                counts["rest"] += 1
            except Exception as exc:  # noqa: BLE001 - every failure counts
                counts["failed"] += 1
                failures.append(repr(exc))

    callers = [threading.Thread(target=f) for f in (keep_calling_grpc, keep_calling_rest)]
    for caller in callers:
        caller.start()
    try:
        time.sleep(1.0)
        # Rotate as an operator would: new files written aside, then moved into place.
        fresh = pki["ca"].issue("server-next", "localhost", server=True)
        server_files: Issued = pki["server"]
        os.replace(fresh.key, server_files.key)
        os.replace(fresh.cert, server_files.cert)
        deadline = time.monotonic() + 15
        after = dict(before)
        while time.monotonic() < deadline and any(after[d] == before[d] for d in after):
            after = {door: served_certificate(a, alpn) for door, a, alpn in _doors(server)}
            time.sleep(0.3)
        time.sleep(1.0)
    finally:
        stop.set()
        for caller in callers:
            caller.join(30)
    assert all(after[d] != before[d] for d in after), "the new certificate was not served"
    assert counts["failed"] == 0, failures[:3]
    assert counts["grpc"] > 10 and counts["rest"] > 10, counts
    # A new client trusts the new certificate as it did the old.
    assert grpc_tls_client(server.url, pki, None).is_server_live()


def _doors(server: Any) -> list[tuple[str, str, str]]:
    return [("grpc", server.url, "h2"), ("rest", server.http_url, "http/1.1")]


def test_bad_tls_settings_stop_the_start(repo: Path, pki: dict[str, Any], tmp_path: Path) -> None:
    import subprocess
    import sys

    other = pki["alice"]  # a key that is not the server certificate's
    result = subprocess.run(
        [sys.executable, "-m", "tiffin.server.cli", "serve", "--model-repository", str(repo)]
        + ["--grpc-port", "0", "--http-port", "0", "--metrics-port", "0", "--grpc-use-ssl"]
        + ["--grpc-server-cert", str(pki["server"].cert), "--grpc-server-key", str(other.key)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TIFFIN_ALLOWED_BACKENDS": "toy_backends"},
    )
    assert result.returncode == 1
    assert "cannot be used together" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "tiffin.server.cli", "serve", "--model-repository", str(repo)]
        + ["--grpc-use-ssl-mutual", "--grpc-server-cert", "a", "--grpc-server-key", "b"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--grpc-use-ssl-mutual needs --grpc-root-cert" in result.stderr


# ---- JWTs ----------------------------------------------------------------------------------


def test_jwt_claims_are_checked(make_server, repo: Path, tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "jwt.pub").write_bytes(public_pem)
    other = ec.generate_private_key(ec.SECP256R1())
    server = make_server(
        repo,
        *("--auth-jwt-key", str(tmp_path / "jwt.pub")),
        *("--auth-jwt-audience", "tiffin", "--auth-jwt-issuer", "https://issuer.test"),
        env=DEFAULT_MODE,
    )
    now = int(time.time())
    good = {
        "sub": "svc-a",
        "aud": "tiffin",
        "iss": "https://issuer.test",
        "exp": now + 300,
        "roles": ["infer"],
    }

    def sign(claims: dict[str, Any], signer: Any = key, algorithm: str = "RS256") -> str:
        return jwt.encode(claims, signer, algorithm=algorithm)

    cases = {
        "valid": (sign(good), 200, ""),
        "scope string": (sign({**good, "roles": "read infer"}), 200, ""),
        "expired": (sign({**good, "exp": now - 60}), 401, "expired"),
        "not yet": (sign({**good, "nbf": now + 600}), 401, "not valid yet"),
        "audience": (sign({**good, "aud": "someone"}), 401, "another audience"),
        "issuer": (sign({**good, "iss": "https://evil.test"}), 401, "another issuer"),
        "no exp": (sign({k: v for k, v in good.items() if k != "exp"}), 401, "'exp'"),
        "other key": (sign(good, other, "ES256"), 401, "signature"),
        "alg none": (jwt.encode(good, None, algorithm="none"), 401, "algorithm"),
        "hs256 with the public key": (_hs256(good, public_pem), 401, "algorithm"),
        "no role": (sign({**good, "roles": []}), 403, "needs the 'infer' role"),
        "tampered": (sign(good)[:-4] + "AAAA", 401, "signature"),
        "garbage": ("not.a.jwt", 401, ""),
    }
    results = {}
    for name, (token, status, fragment) in cases.items():
        got, _, reply = rest_request(
            server.http_url,
            "POST",
            "/v2/models/echo/infer",
            {"authorization": f"Bearer {token}"},
            INFER_BODY,
        )
        results[name] = (got, reply.decode()[:160])
        assert got == status and fragment in reply.decode(), (name, results[name])
        assert token.encode() not in reply
    # gRPC reads the same metadata.
    client = grpcclient.InferenceServerClient(server.url)
    assert client.infer(
        "echo", one_input(grpcclient), headers={"authorization": f"Bearer {sign(good)}"}
    )


def _hs256(claims: dict[str, Any], secret: bytes) -> str:
    """A token signed HMAC-SHA256 with the public key as the secret: the classic confusion."""
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    signature = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(signature)}"


def test_jwks_file_picks_the_key_by_kid(make_server, repo: Path, tmp_path: Path) -> None:
    keys = {kid: ec.generate_private_key(ec.SECP256R1()) for kid in ("2026-10", "2026-11")}
    jwks = {
        "keys": [
            {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(k.public_key())), "kid": kid}
            for kid, k in keys.items()
        ]
    }
    (tmp_path / "jwks.json").write_text(json.dumps(jwks))
    server = make_server(repo, "--auth-jwks-file", str(tmp_path / "jwks.json"), env=DEFAULT_MODE)
    claims = {"sub": "svc", "exp": int(time.time()) + 300, "roles": ["read"]}
    for kid, key in keys.items():
        token = jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})
        status, _, _ = rest_request(
            server.http_url, "GET", "/v2/models/other", {"authorization": f"Bearer {token}"}
        )
        assert status == 200, kid
    wrong = jwt.encode(claims, keys["2026-10"], algorithm="ES256", headers={"kid": "2026-11"})
    status, _, reply = rest_request(
        server.http_url, "GET", "/v2/models/other", {"authorization": f"Bearer {wrong}"}
    )
    assert status == 401 and b"signature" in reply


def test_token_file_changes_apply_without_a_restart(
    make_server, repo: Path, tmp_path: Path
) -> None:
    tokens = token_file(tmp_path)
    server = make_server(repo, "--auth-token-file", str(tokens), env=DEFAULT_MODE)
    client = grpcclient.InferenceServerClient(server.url)
    assert client.get_model_metadata("other", headers=bearer("reader"))
    # reader revoked, a new one added
    document = yaml.safe_load(tokens.read_text())
    document["principals"] = [p for p in document["principals"] if p["name"] != "reader"]
    new_token = "tk_new_" + "d4" * 16
    document["principals"].append(
        {"name": "new", "roles": ["read"], "token_sha256": token_digest(new_token)}
    )
    aside = tmp_path / "tokens.yaml.new"
    aside.write_text(yaml.safe_dump(document))
    os.replace(aside, tokens)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            client.get_model_metadata("other", headers={"authorization": f"Bearer {new_token}"})
            break
        except InferenceServerException:
            time.sleep(0.2)
    assert client.get_model_metadata("other", headers={"authorization": f"Bearer {new_token}"})
    with pytest.raises(InferenceServerException) as revoked:
        client.get_model_metadata("other", headers=bearer("reader"))
    assert revoked.value.status() == "StatusCode.UNAUTHENTICATED"
    # A broken file keeps the last good one.
    tokens.write_text("principals: [ {name: broken")
    time.sleep(1.5)
    assert client.get_model_metadata("other", headers={"authorization": f"Bearer {new_token}"})
    assert "the previous one stays" in server.log()


# ---- limits per client ---------------------------------------------------------------------


def test_requests_per_second_trip_and_recover(make_server, repo: Path, tmp_path: Path) -> None:
    server = make_server(
        repo,
        *("--auth-token-file", str(token_file(tmp_path))),
        *("--client-max-rps", "5", "--client-burst", "5"),
        env=DEFAULT_MODE,
    )
    client = grpcclient.InferenceServerClient(server.url)
    outcomes = [grpc_outcome(CALLS["infer echo"][0], client, bearer("alice")) for _ in range(20)]
    assert outcomes[:5] == [OK] * 5
    assert outcomes.count("RESOURCE_EXHAUSTED") >= 10, outcomes
    with pytest.raises(InferenceServerException) as limited:
        client.infer("echo", one_input(grpcclient), headers=bearer("alice"))
    assert "--client-max-rps" in limited.value.message()
    # Another principal has a bucket of its own.
    assert grpc_outcome(CALLS["metadata other"][0], client, bearer("reader")) == OK
    time.sleep(1.2)
    assert grpc_outcome(CALLS["infer echo"][0], client, bearer("alice")) == OK


def test_requests_in_flight_are_limited_per_client(make_server, repo: Path) -> None:
    server = make_server(repo, "--client-max-inflight", "1", env=DEFAULT_MODE)
    client = grpcclient.InferenceServerClient(server.url)
    slow = threading.Thread(
        target=lambda: client.infer("slow", one_input(grpcclient, 1.5)), daemon=True
    )
    slow.start()
    time.sleep(0.5)
    with pytest.raises(InferenceServerException) as limited:
        client.infer("echo", one_input(grpcclient))
    assert limited.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "--client-max-inflight" in limited.value.message()
    slow.join(10)
    assert client.infer("echo", one_input(grpcclient)).as_numpy("OUTPUT0") is not None


def test_tensor_elements_are_capped(make_server, tmp_path: Path) -> None:
    wide = ECHO.replace("dims: [2]", "dims: [-1]")
    repo = write_repository(tmp_path / "repo", {"wide": wide})
    server = make_server(repo, "--max-request-elements", "1000")
    client = grpcclient.InferenceServerClient(server.url)
    small = grpcclient.InferInput("INPUT0", [1, 1000], "FP32")
    small.set_data_from_numpy(np.zeros((1, 1000), np.float32))
    assert client.infer("wide", [small]).as_numpy("OUTPUT0").shape == (1, 1000)
    large = grpcclient.InferInput("INPUT0", [1, 1001], "FP32")
    large.set_data_from_numpy(np.zeros((1, 1001), np.float32))
    with pytest.raises(InferenceServerException) as capped:
        client.infer("wide", [large])
    assert "holds 1001 tensor elements" in capped.value.message()
    assert "--max-request-elements" in capped.value.message()


def test_errors_keep_server_paths_from_non_admins(make_server, repo: Path) -> None:
    server = make_server(repo)  # explicit mode, no authentication: nobody is an admin
    client = grpcclient.InferenceServerClient(server.url)
    with pytest.raises(InferenceServerException) as missing:
        client.load_model("no_such_model")
    message = missing.value.message()
    assert str(repo) not in message and "<repository>/no_such_model" in message


def test_a_stream_that_ends_gives_back_its_slots(make_server, repo: Path) -> None:
    """Requests of a stream its client abandons still finish: their client's in-flight slots
    come back (they were lost until the stream's contexts finished on close)."""
    server = make_server(repo, "--client-max-inflight", "2", env=DEFAULT_MODE)
    client = grpcclient.InferenceServerClient(server.url)
    results: list[Any] = []
    client.start_stream(callback=lambda result, error: results.append(error or result))
    for _ in range(2):
        client.async_stream_infer("slow", one_input(grpcclient, 1.0))
    time.sleep(0.3)
    with pytest.raises(InferenceServerException) as limited:
        client.infer("echo", one_input(grpcclient))
    assert "--client-max-inflight" in limited.value.message()
    client.stop_stream(cancel_requests=True)  # the client goes away mid-stream
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            assert client.infer("echo", one_input(grpcclient)).as_numpy("OUTPUT0") is not None
            break
        except InferenceServerException:
            time.sleep(0.2)
    else:
        raise AssertionError("the abandoned stream's slots never came back")


def test_http_connections_are_capped(make_server, repo: Path) -> None:
    """Idle connections cannot hold every socket: beyond --http-max-connections a new one is
    answered 503 and closed; once some close, requests are served again."""
    server = make_server(repo, "--http-max-connections", "4", env=DEFAULT_MODE)
    host, port = server.http_url.rsplit(":", 1)
    idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(4)]
    try:
        time.sleep(0.3)  # the server has taken them
        with socket.create_connection((host, int(port)), timeout=5) as extra:
            extra.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while chunk := extra.recv(4096):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 503") and b"--http-max-connections" in reply
    finally:
        for connection in idle[:2]:
            connection.close()
    time.sleep(0.3)
    status, _, _ = rest_request(server.http_url, "GET", "/v2/health/live", {})
    assert status == 200
    for connection in idle[2:]:
        connection.close()
    import urllib.request

    scrape = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    assert 'tiffin_requests_refused_total{protocol="rest",reason="connections"} 1' in scrape
