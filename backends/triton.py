"""Triton passthrough backend: forwards each request to a remote KServe v2 / Triton gRPC server
(Triton itself, or another Tiffin), in the frontend process, without worker or batching.

The model needs no file: its version folder (`1/`) may be empty. Inputs, outputs and
max_batch_size left out of config.yaml are read from the remote's ModelMetadata and
ModelConfig when the repository is read; what the config declares is checked against them.

Parameters (config.yaml `parameters`):
  url                      the remote server, host:port (required)
  model_name               the remote model (default: this model's name)
  model_version            the remote version (default "": the remote's newest ready one)
  timeout_seconds          limit of one forwarded call, also capped by the caller's own
                           deadline (default 60; 0: only the caller's deadline)
  connect_timeout_seconds  limit of the calls that read the remote's metadata and check its
                           readiness at load (default 5)
  ssl                      true: connect with TLS (default false)
  root_certificates        PEM file of the CAs to trust (default: the system's); needs ssl
  private_key              PEM file of the client key for mutual TLS; needs ssl and
                           certificate_chain
  certificate_chain        PEM file of the client certificate chain; needs ssl and private_key
  ssl_target_name_override host name to verify the remote's certificate against; needs ssl
  max_message_bytes        largest message sent to or received from the remote
                           (default 2147483647, as Triton)

Errors the remote answers reach the caller with the remote's status code and message;
a remote that cannot be reached answers UNAVAILABLE naming its URL, and a deadline that
passes while forwarding answers DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from tiffin.clients.codec import build_request, read_response
from tiffin.protos import MAX_MESSAGE_BYTES, method_path, protocol
from tiffin.protos.errors import BackendError, DeadlineExceeded, RemoteError, TiffinError
from tiffin.protos.model_config import ModelConfig, ParameterValue, TensorConfig, dims_within

from .base import ForwardingBackend, reject_unknown_parameters

PARAMETERS = (
    "url",
    "model_name",
    "model_version",
    "timeout_seconds",
    "connect_timeout_seconds",
    "ssl",
    "root_certificates",
    "private_key",
    "certificate_chain",
    "ssl_target_name_override",
    "max_message_bytes",
    "load_balancing",
)
DEFAULT_TIMEOUT_SECONDS = 60.0
DEFAULT_CONNECT_TIMEOUT_SECONDS = 5.0
# Codes that say the remote could not be reached, rather than that it refused the request.
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _text(params: dict[str, ParameterValue], key: str, default: str = "") -> str:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"parameters.{key} must be a string, got {value!r}")
    return str(value)


def _seconds(params: dict[str, ParameterValue], key: str, default: float) -> float:
    value = params.get(key, default)
    try:
        if isinstance(value, bool):
            raise ValueError
        seconds = float(value)
    except ValueError:
        raise ValueError(f"parameters.{key} must be a number of seconds, got {value!r}") from None
    if seconds < 0:
        raise ValueError(f"parameters.{key} must be >= 0, got {seconds:g}")
    return seconds


def _service_config(balancing: str) -> dict[str, Any]:
    """The channel's service config: `balancing` over the url's addresses (several with
    'ipv4:host:port,host:port'), a remote leaving the rotation as soon as its gRPC health turns
    NOT_SERVING (a server starting to shut down), and a call the remote refused with
    UNAVAILABLE tried again, on another address where there is one."""
    return {
        "loadBalancingConfig": [{balancing: {}}],
        # "": the whole server, which Triton and Tiffin both answer.
        "healthCheckConfig": {"serviceName": ""},
        "methodConfig": [
            {
                "name": [{"service": "inference.GRPCInferenceService", "method": "ModelInfer"}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }


def _flag(params: dict[str, ParameterValue], key: str) -> bool:
    value = params.get(key, False)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"parameters.{key} must be true or false, got {value!r}")


def _pem(params: dict[str, ParameterValue], key: str) -> bytes | None:
    if key not in params:
        return None
    path = Path(_text(params, key)).expanduser()
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"parameters.{key}: {path} cannot be read: {exc.strerror}") from None


@dataclass(frozen=True)
class RemoteSettings:
    """Where and how to forward, read from config.yaml `parameters` (see the module doc)."""

    url: str
    model_name: str
    model_version: str
    timeout_seconds: float  # 0: only the caller's deadline limits a call
    connect_timeout_seconds: float
    credentials: grpc.ChannelCredentials | None  # None: plaintext
    options: tuple[tuple[str, Any], ...]

    @classmethod
    def from_config(cls, config: ModelConfig) -> RemoteSettings:
        """Validates the parameters; ValueError naming the parameter that is wrong."""
        params = config.parameters
        reject_unknown_parameters(config, PARAMETERS, "triton")
        url = _text(params, "url").strip()
        if not url:
            raise ValueError("parameters.url is required: the remote server as host:port")
        host, _, port = url.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"parameters.url must be host:port, got '{url}'")
        max_bytes = params.get("max_message_bytes", MAX_MESSAGE_BYTES)
        if isinstance(max_bytes, bool) or not str(max_bytes).isdigit() or int(max_bytes) < 1024:
            raise ValueError(
                f"parameters.max_message_bytes must be a whole number >= 1024, got {max_bytes!r}"
            )
        balancing = _text(params, "load_balancing", "pick_first")
        if balancing not in ("pick_first", "round_robin"):
            raise ValueError(
                f"parameters.load_balancing must be pick_first or round_robin, got '{balancing}'"
            )
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", int(max_bytes)),
            ("grpc.max_receive_message_length", int(max_bytes)),
            ("grpc.service_config", json.dumps(_service_config(balancing))),
            ("grpc.enable_retries", 1),
        ]
        return cls(
            url=url,
            model_name=_text(params, "model_name", config.name) or config.name,
            model_version=_text(params, "model_version"),
            timeout_seconds=_seconds(params, "timeout_seconds", DEFAULT_TIMEOUT_SECONDS),
            connect_timeout_seconds=_seconds(
                params, "connect_timeout_seconds", DEFAULT_CONNECT_TIMEOUT_SECONDS
            )
            or DEFAULT_CONNECT_TIMEOUT_SECONDS,
            credentials=_credentials(params, options),
            options=tuple(options),
        )

    @property
    def remote(self) -> str:
        """The remote model as a phrase for messages."""
        version = f" version {self.model_version}" if self.model_version else ""
        return f"model '{self.model_name}'{version} on remote server {self.url}"

    def call_timeout(self, caller: float | None) -> float | None:
        """Seconds a forwarded call may take: the caller's deadline, capped by timeout_seconds."""
        limits = [t for t in (caller, self.timeout_seconds or None) if t is not None]
        return min(limits) if limits else None


def _credentials(
    params: dict[str, ParameterValue], options: list[tuple[str, Any]]
) -> grpc.ChannelCredentials | None:
    """TLS credentials when `ssl` is on; the TLS parameters without it are a mistake."""
    tls_keys = ("root_certificates", "private_key", "certificate_chain", "ssl_target_name_override")
    ssl = _flag(params, "ssl")
    if not ssl:
        given = [k for k in tls_keys if k in params]
        if given:
            raise ValueError(f"parameters {', '.join(given)} need parameters.ssl: true")
        return None
    if ("private_key" in params) != ("certificate_chain" in params):
        one, other = (
            ("private_key", "certificate_chain")
            if "private_key" in params
            else ("certificate_chain", "private_key")
        )
        raise ValueError(f"parameters.{one} needs parameters.{other} too (mutual TLS)")
    if "ssl_target_name_override" in params:
        options.append(("grpc.ssl_target_name_override", _text(params, "ssl_target_name_override")))
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(params, "root_certificates"),
        private_key=_pem(params, "private_key"),
        certificate_chain=_pem(params, "certificate_chain"),
    )


def _unary(channel: Any, rpc: str) -> Any:
    """A callable for one unary RPC on our private protocol classes."""
    pb = protocol()
    method = pb.service.methods_by_name[rpc]
    return channel.unary_unary(
        method_path(rpc),
        request_serializer=getattr(pb, method.input_type.name).SerializeToString,
        response_deserializer=getattr(pb, method.output_type.name).FromString,
    )


def _status(exc: Any) -> str:
    """A failed call's status as "CODE: details" (calls' errors are also grpc.Call objects)."""
    return f"{exc.code().name}: {exc.details()}"


# ---- config completion (blocking, in a thread of the server or in `serverctl validate`) ----


def _remote_description(settings: RemoteSettings) -> tuple[Any, Any | None]:
    """The remote model's ModelMetadata, and its ModelConfig (None where not offered)."""
    pb = protocol()
    if settings.credentials is None:
        channel = grpc.insecure_channel(settings.url, options=settings.options)
    else:
        channel = grpc.secure_channel(settings.url, settings.credentials, options=settings.options)
    name, version = settings.model_name, settings.model_version
    timeout = settings.connect_timeout_seconds
    with channel:
        try:
            metadata = _unary(channel, "ModelMetadata")(
                pb.ModelMetadataRequest(name=name, version=version), timeout=timeout
            )
        except grpc.RpcError as exc:
            if exc.code() in _UNREACHABLE:  # type: ignore[attr-defined]
                raise ValueError(
                    f"remote server {settings.url} is not reachable: {_status(exc)}"
                ) from None
            raise ValueError(f"{settings.remote} cannot be described: {_status(exc)}") from None
        try:
            config = _unary(channel, "ModelConfig")(
                pb.ModelConfigRequest(name=name, version=version), timeout=timeout
            ).config
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:  # type: ignore[attr-defined]
                raise ValueError(
                    f"{settings.remote} does not give its config: {_status(exc)}"
                ) from None
            config = None  # a plain KServe v2 server: metadata only
    return metadata, config


def _remote_tensors(
    metadata_tensors: Any, config_tensors: Any, batching: bool, what: str
) -> list[TensorConfig]:
    """The remote's tensors as this server declares them (without the batch dimension)."""
    optional = {t.name for t in config_tensors if getattr(t, "optional", False)}
    tensors = []
    for t in metadata_tensors:
        shape = list(t.shape)
        if batching:
            if not shape or shape[0] != -1:
                raise ValueError(
                    f"the remote {what} '{t.name}' has shape {shape}, without the variable "
                    "batch dimension its max_batch_size promises"
                )
            shape = shape[1:]
        try:
            tensors.append(
                TensorConfig(
                    name=t.name, datatype=t.datatype, dims=shape, optional=t.name in optional
                )
            )
        except ValueError as exc:
            raise ValueError(f"the remote {what} '{t.name}' cannot be served: {exc}") from None
    return tensors


def _complete_tensors(
    declared: list[TensorConfig], remote: list[TensorConfig], what: str, remote_url: str
) -> list[TensorConfig]:
    """Checks declared tensors against the remote's and fills in what was left out."""
    if not declared:
        return remote
    by_name = {t.name: t for t in remote}
    for given in declared:
        found = by_name.get(given.name)
        if found is None:
            raise ValueError(
                f"{what}s: '{given.name}' is not an {what} of the remote model at {remote_url}; "
                f"it has {', '.join(by_name) or 'none'}"
            )
        if given.datatype != found.datatype:
            raise ValueError(
                f"{what}s: '{given.name}' is declared {given.datatype} but the remote model at "
                f"{remote_url} has {found.datatype}"
            )
        if not dims_within(given.dims, found.dims):
            raise ValueError(
                f"{what}s: '{given.name}' is declared with dims {given.dims} but the remote "
                f"model at {remote_url} has {found.dims}"
            )
    if what == "input":
        names = {t.name for t in declared}
        missing = [t.name for t in remote if t.name not in names and not t.optional]
        if missing:
            raise ValueError(
                f"inputs: the remote model at {remote_url} requires {', '.join(missing)}, "
                "which the config leaves out"
            )
    return declared


def _max_batch_size(config: ModelConfig, remote_config: Any, settings: RemoteSettings) -> int:
    """The proxy's max_batch_size: the declared one if the remote can take it, else the remote's.

    A remote that gives no ModelConfig is taken not to batch: its shapes pass through whole.
    """
    remote = int(remote_config.max_batch_size) if remote_config is not None else None
    declared = config.max_batch_size
    if remote is None:
        return declared or 0
    if declared is None:
        return remote
    if (declared > 0) != (remote > 0) or declared > remote:
        expected = f"1..{remote}" if remote else "0"
        raise ValueError(
            f"max_batch_size is {declared} but the remote model at {settings.url} has "
            f"max_batch_size {remote}; set {expected} or leave it out"
        )
    return declared


class TritonBackend(ForwardingBackend):
    """Forwards requests to a model on a remote KServe v2 / Triton gRPC server."""

    name = "triton"
    model_filenames = ()  # no model file: the version folder itself stands for the version

    def __init__(self) -> None:
        self._settings: RemoteSettings | None = None
        self._channel: grpc.aio.Channel | None = None
        self._infer_call: Any = None
        self._datatypes: dict[str, str] = {}

    @classmethod
    def complete_config(cls, config: ModelConfig, model_path: Path) -> ModelConfig:
        """Fills in inputs, outputs and max_batch_size from the remote; checks the rest.

        Blocks for up to connect_timeout_seconds per call; ValueError naming the URL and
        the remote's status when it cannot be asked, or the field that disagrees with it.
        """
        settings = RemoteSettings.from_config(config)
        if config.dynamic_batching is not None:
            raise ValueError(
                "dynamic_batching: the triton backend forwards each request as it arrives and "
                "does not batch or queue; configure batching on the remote model instead"
            )
        metadata, remote_config = _remote_description(settings)
        max_batch = _max_batch_size(config, remote_config, settings)
        batching = remote_config is not None and remote_config.max_batch_size > 0
        inputs = _remote_tensors(
            metadata.inputs, remote_config.input if remote_config else [], batching, "input"
        )
        outputs = _remote_tensors(metadata.outputs, [], batching, "output")
        if not batching and max_batch:
            # A remote known only by its metadata: the declared batching strips its first dim.
            inputs = [_strip_batch(t, "input") for t in inputs]
            outputs = [_strip_batch(t, "output") for t in outputs]
        return config.model_copy(
            update={
                "backend": cls.name,
                # Not "ensemble": here it is one model, and tools would look for its steps.
                "platform": config.platform
                or ("" if metadata.platform == "ensemble" else metadata.platform),
                "max_batch_size": max_batch,
                "inputs": _complete_tensors(config.inputs, inputs, "input", settings.url),
                "outputs": _complete_tensors(config.outputs, outputs, "output", settings.url),
            }
        )

    async def load(self, config: ModelConfig, version_dir: Path) -> None:
        """Opens a channel on the running loop and checks that the remote model is ready."""
        settings = RemoteSettings.from_config(config)
        if settings.credentials is None:
            channel = grpc.aio.insecure_channel(settings.url, options=settings.options)
        else:
            channel = grpc.aio.secure_channel(
                settings.url, settings.credentials, options=settings.options
            )
        pb = protocol()
        try:
            reply = await _unary(channel, "ModelReady")(
                pb.ModelReadyRequest(name=settings.model_name, version=settings.model_version),
                timeout=settings.connect_timeout_seconds,
            )
        except grpc.aio.AioRpcError as exc:
            await channel.close()
            if exc.code() in _UNREACHABLE:
                raise RuntimeError(
                    f"remote server {settings.url} is not reachable: {_status(exc)}"
                ) from None
            raise RuntimeError(f"{settings.remote} cannot be checked: {_status(exc)}") from None
        if not reply.ready:
            await channel.close()
            raise RuntimeError(f"{settings.remote} is not ready")
        self._settings = settings
        self._channel = channel
        self._infer_call = _unary(channel, "ModelInfer")
        self._datatypes = {t.name: t.datatype for t in [*config.inputs, *config.outputs]}

    async def infer(
        self,
        inputs: dict[str, np.ndarray],
        outputs: list[str],
        parameters: dict[str, Any],
        timeout: float | None,
    ) -> dict[str, np.ndarray]:
        """Forwards one request as a ModelInferRequest with raw tensors and waits for it."""
        settings = self._settings
        assert settings is not None, "infer before load"
        # Reserved parameters the remote acts on (priority, timeout, sequence_*) go along;
        # triton_* ones describe this server's own stream and stay here.
        forwarded = {k: v for k, v in parameters.items() if not k.startswith("triton_")}
        request = build_request(
            settings.model_name, inputs, outputs, settings.model_version, "", forwarded
        )
        for tensor in request.inputs:
            # The declared datatype, not numpy's guess (BF16 without ml_dtypes is uint16).
            tensor.datatype = self._datatypes[tensor.name]
        limit = settings.call_timeout(timeout)
        try:
            response = await self._infer_call(request, timeout=limit)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, timeout, limit) from None
        for out in response.outputs:
            expected = self._datatypes.get(out.name)
            if expected is not None and out.datatype != expected:
                raise BackendError(
                    f"{settings.remote} returned output '{out.name}' as {out.datatype}, but "
                    f"this model declares {expected}"
                )
        return read_response(response)

    def _error(
        self, exc: grpc.aio.AioRpcError, caller: float | None, limit: float | None
    ) -> TiffinError:
        """The caller's view of a failed forward: the remote's code and message."""
        settings = self._settings
        assert settings is not None
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            which = (
                "the caller's deadline"
                if caller is not None and limit == caller
                else f"timeout_seconds ({settings.timeout_seconds:g} s)"
            )
            return DeadlineExceeded(
                f"{which} passed while waiting for {settings.remote} ({details})"
            )
        if code == grpc.StatusCode.UNAVAILABLE:
            return RemoteError(code, f"remote server {settings.url} is unavailable: {details}")
        return RemoteError(code, details or f"{settings.remote} failed with {code.name}")

    async def unload(self) -> None:
        """Closes the channel (the executor has let requests in flight finish)."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


def _strip_batch(tensor: TensorConfig, what: str) -> TensorConfig:
    if not tensor.dims or tensor.dims[0] != -1:
        raise ValueError(
            f"max_batch_size is set but the remote {what} '{tensor.name}' has shape "
            f"{tensor.dims}, without a variable first dimension to batch on; set max_batch_size: 0"
        )
    return tensor.model_copy(update={"dims": tensor.dims[1:]})
