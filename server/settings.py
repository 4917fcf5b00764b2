"""Server settings: one typed model, from which both CLI flags and TIFFIN_ env overrides come."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .observability.trace_config import TraceConfig, parse_trace_config

ENV_PREFIX = "TIFFIN_"


class ServerSettings(BaseModel):
    """How `serverctl serve` runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_repository: Path = Field(description="Folder of models, one sub-folder each.")
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 for all).")
    grpc_port: int = Field(8001, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    http_port: int = Field(8000, ge=0, le=65535, description="HTTP/REST port; 0 picks a free one.")
    allow_http: bool = Field(
        True, description="Serve the KServe v2 HTTP/REST protocol on --http-port (Triton's flag)."
    )
    metrics_port: int = Field(
        8002,
        ge=0,
        le=65535,
        description="Prometheus metrics port (GET /metrics); 0 picks a free one.",
    )
    allow_metrics: bool = Field(
        True, description="Serve Prometheus metrics on --metrics-port (Triton's flag)."
    )
    http_max_inflight: int = Field(
        256,
        ge=1,
        description="Most HTTP requests read or answered at once; beyond it requests get 429 "
        "at once (health probes are always answered).",
    )
    http_max_connections: int = Field(
        1000,
        ge=1,
        description="Most HTTP connections open at once; beyond it a new connection is "
        "answered 503 and closed (idle and slow clients cannot hold every socket).",
    )
    http_max_input_size: int = Field(
        64 << 20,
        ge=1024,
        description="Largest JSON part of an HTTP inference request, in bytes (Triton's "
        "--http-max-input-size); larger tensors travel binary.",
    )
    cpu_scheduling: Literal["batch", "normal"] = Field(
        "batch",
        description="Linux scheduling policy of the server's threads and workers: batch "
        "(SCHED_BATCH: a thread woken by another does not take its core at once; under load "
        "that spares a switch to a thread that would only wait for Python's lock) or normal.",
    )
    frontend_core: Literal["auto", "pin", "none"] = Field(
        "auto",
        description="Where the frontend's threads (gRPC, HTTP, batching) run: pin keeps them "
        "on one of the server's cores, and the models' threads on all of them, so that "
        "Python's lock passes between threads on one core instead of across cores; auto "
        "pins where cores were set aside for this server (an affinity or cpuset narrower "
        "than the machine and not cut down by a cgroup quota); none never pins.",
    )
    grpc_threads: int = Field(
        256,
        ge=1,
        description="gRPC handler threads; also the most RPCs served at once (streams hold one "
        "each); beyond it calls get RESOURCE_EXHAUSTED.",
    )
    max_streams: int = Field(
        0,
        ge=0,
        description="Most ModelStreamInfer streams open at once (each holds a handler thread); "
        "0: three quarters of --grpc-threads, so that health checks and unary calls always "
        "find a thread. Beyond it new streams get RESOURCE_EXHAUSTED.",
    )
    max_streams_per_connection: int = Field(
        100, ge=1, description="Most streams open at once on one client connection."
    )
    max_stream_inflight: int = Field(
        64,
        ge=1,
        description="Requests of one stream read but not yet answered; beyond it the server "
        "reads no more from that stream until the client reads its responses.",
    )
    stream_idle_timeout_seconds: float = Field(
        300.0,
        ge=0,
        description="A stream with no request and nothing in flight for this long is closed "
        "(UNAVAILABLE); 0: never.",
    )
    max_message_bytes: int = Field(
        0,
        ge=0,
        description="Largest request or response message, in bytes; 0: requests up to what "
        "the repository's models can accept (the largest batch of every input; 2 GiB - 1 if "
        "a model's inputs have no fixed size), responses up to 2 GiB - 1.",
    )

    @field_validator("max_message_bytes")
    @classmethod
    def _room_for_a_message(cls, value: int) -> int:
        if 0 < value < 1024:
            raise ValueError("it must be 0 (automatic) or at least 1024 bytes")
        return value

    allowed_backends: str = Field(
        "",
        description="Backends that config.yaml may name by import path, comma-separated: "
        "'module:Class', or 'module' for every class in it and its submodules; others are "
        "refused, so that a config cannot import arbitrary code.",
    )
    model_control_mode: Literal["none", "explicit", "poll"] = Field(
        "none",
        description="Triton's model control: 'none' loads the whole repository at start and "
        "refuses load and unload calls (except from an admin, once --auth-* is set); "
        "'explicit' loads only the --load-model models at start and takes load and unload "
        "calls; 'poll' loads the whole repository and then follows its changes every "
        "--repository-poll-secs (load and unload calls refused, as in 'none').",
    )
    repository_poll_secs: float = Field(
        15.0,
        ge=0.1,
        description="With --model-control-mode poll: seconds between looks at the repository.",
    )
    load_model: tuple[str, ...] = Field(
        (),
        description="With --model-control-mode explicit: a model to load at start; repeat "
        "the flag for more, '*' for every model (comma-separated in the variable).",
    )
    # ---- TLS: Triton's flag names; the HTTP ones fall back to the gRPC files. ----
    grpc_use_ssl: bool = Field(False, description="Serve gRPC over TLS.")
    grpc_use_ssl_mutual: bool = Field(
        False,
        description="Serve gRPC over mutual TLS: clients must present a certificate signed "
        "by --grpc-root-cert (implies --grpc-use-ssl).",
    )
    grpc_server_cert: str = Field("", description="PEM file of the gRPC server's certificate.")
    grpc_server_key: str = Field("", description="PEM file of the gRPC server's private key.")
    grpc_root_cert: str = Field(
        "", description="PEM file of the certificate authorities trusted for client certificates."
    )
    http_use_ssl: bool = Field(False, description="Serve HTTP/REST over TLS (HTTPS).")
    http_use_ssl_mutual: bool = Field(
        False,
        description="Serve HTTP/REST over mutual TLS (implies --http-use-ssl).",
    )
    http_server_cert: str = Field(
        "", description="PEM certificate for HTTPS; default: --grpc-server-cert."
    )
    http_server_key: str = Field(
        "", description="PEM private key for HTTPS; default: --grpc-server-key."
    )
    http_root_cert: str = Field(
        "",
        description="PEM CA certificates for HTTPS client certificates; default: --grpc-root-cert.",
    )
    # ---- who may call what ----
    auth_token_file: str = Field(
        "",
        description="YAML file of principals: each with roles, and a bearer token's SHA-256 "
        "and/or a client certificate subject. Setting any --auth-* turns authentication on.",
    )
    auth_jwt_key: str = Field(
        "", description="PEM public key that signs accepted JWT bearer tokens."
    )
    auth_jwks_file: str = Field(
        "", description="JWKS (JSON Web Key Set) file of keys that sign accepted JWTs."
    )
    auth_jwt_audience: str = Field("", description="Required JWT 'aud' claim, if set.")
    auth_jwt_issuer: str = Field("", description="Required JWT 'iss' claim, if set.")
    auth_jwt_roles_claim: str = Field(
        "roles", description="JWT claim holding the roles (a list, or a space-separated string)."
    )
    auth_jwt_algorithms: str = Field(
        "RS256,ES256,EdDSA",
        description="Accepted JWT signature algorithms, comma-separated (asymmetric only).",
    )
    auth_certificate_principals: bool = Field(
        False,
        description="With mutual TLS, a client certificate's subject that the token file "
        "names is a principal, with no token needed.",
    )
    audit_log: str = Field(
        "",
        description="File for the audit log (JSON lines): admin calls and refused "
        "credentials; empty: none.",
    )
    audit_log_max_bytes: int = Field(
        100 << 20, ge=4096, description="The audit log is rotated when it reaches this size."
    )
    audit_log_backups: int = Field(5, ge=1, description="Rotated audit logs kept.")
    # ---- limits per client: its principal, or without authentication its address ----
    client_max_inflight: int = Field(
        0, ge=0, description="Most requests one client may have in flight; 0: no limit."
    )
    client_max_rps: float = Field(
        0.0,
        ge=0,
        description="Requests per second one client may send (a token bucket); 0: no limit.",
    )
    client_burst: int = Field(
        0,
        ge=0,
        description="Requests one client may send at once above --client-max-rps; 0: one "
        "second's worth.",
    )
    max_request_elements: int = Field(
        0,
        ge=0,
        description="Most tensor elements in one request, all inputs together; 0: bounded "
        "only by the message size.",
    )
    strict_readiness: bool = Field(
        False, description="ServerReady only when every model is ready (Triton's default)."
    )
    shutdown_grace_seconds: float = Field(
        30.0, ge=0, description="How long in-flight requests may take to finish at shutdown."
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR.")
    # ---- observing: tracing and logs ----
    trace_config: tuple[str, ...] = Field(
        (),
        description="Tracing, in Triton's spelling; repeat the flag: mode=opentelemetry turns "
        "it on, rate=N traces one request in N (default 1000; a request whose traceparent is "
        "sampled is always traced), opentelemetry,url=HOST:PORT is the OTLP/gRPC collector "
        "(plain text on loopback, TLS elsewhere; default: OTEL_EXPORTER_OTLP_ENDPOINT), "
        "opentelemetry,resource=NAME=VALUE adds a resource attribute. Off by default.",
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="'text', or 'json' for one JSON object per line."
    )
    access_log_sample: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of calls logged when answered (one line each: model, version, "
        "status, latency); 0: none, 1: every call.",
    )

    @field_validator("trace_config")
    @classmethod
    def _trace_config_understood(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        parse_trace_config(value)  # a ValueError says which item is wrong
        return value

    @property
    def tracing(self) -> TraceConfig:
        """What --trace-config asks for."""
        return parse_trace_config(self.trace_config)

    @model_validator(mode="after")
    def _streams_leave_threads(self) -> ServerSettings:
        if self.max_streams and self.max_streams >= self.grpc_threads:
            raise ValueError(
                f"--max-streams ({self.max_streams}) must be below --grpc-threads "
                f"({self.grpc_threads}): streams hold a thread each, and health checks and "
                "unary calls need one too"
            )
        return self

    @model_validator(mode="after")
    def _tls_and_auth_complete(self) -> ServerSettings:
        for door in ("grpc", "http"):
            if not (getattr(self, f"{door}_use_ssl") or getattr(self, f"{door}_use_ssl_mutual")):
                continue
            cert, key, root = self.tls_files(door)
            if not cert or not key:
                raise ValueError(
                    f"--{door}-use-ssl needs --{door}-server-cert and --{door}-server-key"
                )
            if getattr(self, f"{door}_use_ssl_mutual") and not root:
                raise ValueError(f"--{door}-use-ssl-mutual needs --{door}-root-cert")
        if self.load_model and self.model_control_mode != "explicit":
            raise ValueError(
                "--load-model needs --model-control-mode explicit (in 'none' mode every model "
                "is loaded at start)"
            )
        jwt_claims = self.auth_jwt_audience or self.auth_jwt_issuer
        if jwt_claims and not (self.auth_jwt_key or self.auth_jwks_file):
            raise ValueError(
                "--auth-jwt-audience and --auth-jwt-issuer need --auth-jwt-key or --auth-jwks-file"
            )
        if self.auth_certificate_principals and not self.auth_token_file:
            raise ValueError(
                "--auth-certificate-principals needs --auth-token-file, which names the "
                "certificate subjects and their roles"
            )
        return self

    def tls_files(self, door: str) -> tuple[str, str, str]:
        """(certificate, key, root) for "grpc" or "http"; HTTP falls back to gRPC's files."""
        grpc_files = (self.grpc_server_cert, self.grpc_server_key, self.grpc_root_cert)
        if door == "grpc":
            return grpc_files
        own = (self.http_server_cert, self.http_server_key, self.http_root_cert)
        cert, key, root = (mine or theirs for mine, theirs in zip(own, grpc_files, strict=True))
        return cert, key, root

    def tls(self, door: str) -> str:
        """'', 'tls' or 'mutual' for "grpc" or "http"."""
        if getattr(self, f"{door}_use_ssl_mutual"):
            return "mutual"
        return "tls" if getattr(self, f"{door}_use_ssl") else ""

    @property
    def authentication(self) -> bool:
        """Whether callers must authenticate (any --auth-* source is set)."""
        return bool(self.auth_token_file or self.auth_jwt_key or self.auth_jwks_file)

    @property
    def stream_limit(self) -> int:
        """How many streams may be open at once."""
        return self.max_streams or max(1, self.grpc_threads * 3 // 4)


def add_settings_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Adds one --flag per settings field; its default comes from TIFFIN_<FIELD> if set."""
    for name, field in ServerSettings.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        env = os.environ.get(ENV_PREFIX + name.upper())
        default: Any = env if env is not None else field.default
        required = field.is_required() and env is None
        help_text = f"{field.description} [env {ENV_PREFIX}{name.upper()}]"
        if get_origin(field.annotation) is tuple:  # a repeatable flag
            parser.add_argument(flag, action=_Repeated, default=None, help=help_text)
            parser.set_defaults(**{name: _listed(env)})
        elif field.annotation is bool:
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=str(default).lower() in ("1", "true", "yes"),
                help=help_text,
            )
        else:
            parser.add_argument(
                flag,
                default=default,
                required=required,
                help=help_text + ("" if required else f" (default: {default})"),
            )


class _Repeated(argparse.Action):
    """A repeatable flag: its values on the command line replace its variable's items (the
    default), rather than adding to them."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        marker = f"_{self.dest}_given"
        given = getattr(namespace, marker, False)
        items = list(getattr(namespace, self.dest) or []) if given else []
        setattr(namespace, self.dest, [*items, values])
        setattr(namespace, marker, True)


def _listed(env: str | None) -> list[str] | None:
    """A repeatable flag's default: its variable's comma-separated items."""
    if env is None:
        return None
    return [item.strip() for item in env.split(",") if item.strip()]


class SettingsError(ValueError):
    """Settings that cannot be used; the message names the flag or variable, the value, and
    what is expected, in sentences."""


def settings_from_arguments(
    args: argparse.Namespace, argv: Sequence[str] | None = None
) -> ServerSettings:
    """The settings the flags (and TIFFIN_ variables) give; SettingsError when any is wrong.

    `argv` tells a flag given on the command line from a value its variable gave."""
    values = {
        name: getattr(args, name)
        for name in ServerSettings.model_fields
        if getattr(args, name, None) is not None
    }
    try:
        return ServerSettings.model_validate(values)
    except ValidationError as exc:
        given = list(sys.argv[1:] if argv is None else argv)
        problems = [_problem(error, given) for error in exc.errors()]
        raise SettingsError(" ".join(problems)) from None


def _source(name: str, given: list[str]) -> str:
    """Where a setting's value came from: its flag, or its environment variable."""
    flag = "--" + name.replace("_", "-")
    variable = ENV_PREFIX + name.upper()
    on_command_line = any(a == flag or a.startswith(flag + "=") for a in given)
    if not on_command_line and variable in os.environ:
        return f"{variable} (the environment variable for {flag})"
    return flag


def _problem(error: Any, given: list[str]) -> str:
    """One pydantic error as a sentence: the flag or variable, the value, what is expected."""
    if not error["loc"]:  # a check across settings: its message names the flags
        return str(error["msg"]).removeprefix("Value error, ") + "."
    name = str(error["loc"][0])
    field = ServerSettings.model_fields.get(name)
    bounds = {
        k: getattr(m, k)
        for m in (field.metadata if field else [])
        for k in ("ge", "le")
        if getattr(m, k, None) is not None
    }
    kind = error["type"]
    if kind in ("int_parsing", "int_from_float", "greater_than_equal", "less_than_equal"):
        expected = "a number" if field and field.annotation is float else "a whole number"
        if "ge" in bounds and "le" in bounds:
            expected += f" from {bounds['ge']} to {bounds['le']}"
        elif "ge" in bounds:
            expected += f" of at least {bounds['ge']}"
    elif kind == "float_parsing":
        expected = "a number"
        if "ge" in bounds:
            expected += f" of at least {bounds['ge']}"
    elif kind == "bool_parsing":
        expected = "true or false"
    elif kind == "literal_error":
        expected = "one of " + str(error["ctx"]["expected"]).replace("'", "")
    elif kind == "missing":
        return f"{_source(name, given)} is required."
    else:
        expected = str(error["msg"]).removeprefix("Value error, ")
        return f"{_source(name, given)} is {error['input']!r}, but {expected}."
    return f"{_source(name, given)} is {error['input']!r}, but it must be {expected}."
