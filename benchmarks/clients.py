"""The Python clients the load generator drives, behind one small async interface.

  lean          grpc.aio with raw-bytes (de)serializers: the request is serialized once up
                front and the same bytes are sent every time, so the client spends as little
                of its core as gRPC allows and the figure is the server's.
  tritonclient  tritonclient.grpc.aio, as applications write it: InferInput per request
                set from numpy, InferResult decoded.
  rest          HTTP/REST (the server's --http-port) with aiohttp: the same request as `lean`,
                as a JSON header plus binary tensor (Triton's binary extension), built once;
                unary only (REST has no streams).
  raw_http      the FastAPI peer's protocol (benchmarks/peers): the item's raw FP32 bytes
                POSTed to /<model> with aiohttp, the body built once; the answer is the
                output's raw bytes. Unary only.
  json_http     the BentoML peer's protocol: `{"x": [[...]]}` (one item, batch dimension
                first) POSTed to /<model> with aiohttp, built once; the answer is JSON.
                Unary only.

A client makes `unary()` calls and opens `Stream`s (ModelStreamInfer); failures raise
`RequestFailed` carrying a status-code name, which the load generator counts.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np

from tiffin.protos import MESSAGE_SIZE_OPTIONS

from .models import INPUT, OUTPUT, ModelSpec

CLIENTS = ("lean", "tritonclient", "rest", "raw_http", "json_http")
UNARY_ONLY = ("rest", "raw_http", "json_http")
CHANNEL_OPTIONS = MESSAGE_SIZE_OPTIONS
IN_BAND = "STREAM_ERROR"  # a stream response carrying error_message (no status code)
INVALID = "INVALID_RESPONSE"


class RequestFailed(Exception):
    """A request that did not succeed; `code` is a grpc.StatusCode name or IN_BAND/INVALID.
    `fatal` means the stream it travelled on is gone."""

    def __init__(self, code: str, message: str = "", fatal: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.fatal = fatal


class Stream:
    """One ModelStreamInfer call: `send()` a request, `recv()` the next answer in order."""

    async def send(self) -> None:
        raise NotImplementedError

    async def recv(self) -> None:
        """Returns when the next response arrived; raises RequestFailed for an error."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class Client:
    """One connection to one server for one model."""

    async def unary(self, timeout: float) -> None:
        raise NotImplementedError

    async def open_stream(self) -> Stream:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


def _code(exc: grpc.aio.AioRpcError) -> str:
    return exc.code().name if exc.code() is not None else "UNKNOWN"


class LeanClient(Client):
    """Pre-serialized requests over one grpc.aio channel; responses checked once, then only
    for errors."""

    def __init__(self, url: str, model: ModelSpec) -> None:
        from tiffin.protos import method_path, protocol

        self._pb = protocol()
        self._model = model
        request = self._pb.ModelInferRequest(model_name=model.name)
        request.inputs.add(name=INPUT, datatype="FP32", shape=[1, *model.input_dims])
        request.raw_input_contents.append(model.sample(1).tobytes())
        self._payload = request.SerializeToString()
        self._channel = grpc.aio.insecure_channel(url, options=CHANNEL_OPTIONS)
        # No serializers: gRPC passes bytes through untouched.
        self._infer = self._channel.unary_unary(method_path("ModelInfer"))
        self._stream = self._channel.stream_stream(method_path("ModelStreamInfer"))
        self._checked = False

    def check(self, response: Any) -> None:
        """The first answer must be OUTPUT0 of the model's size; later ones are not parsed."""
        outputs = list(response.outputs)
        want = 4 * int(np.prod(self._model.output_dims))
        # The echo server answers with the input, so either size is a correct answer.
        sizes = {want, self._model.input_bytes}
        if (
            len(outputs) != 1
            or outputs[0].name != OUTPUT
            or len(response.raw_output_contents) != 1
            or len(response.raw_output_contents[0]) not in sizes
        ):
            raise RequestFailed(INVALID, f"unexpected response {str(response)[:200]}")
        self._checked = True

    async def unary(self, timeout: float) -> None:
        try:
            data = await self._infer(self._payload, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise RequestFailed(_code(exc), exc.details() or "") from None
        if not self._checked:
            self.check(self._pb.ModelInferResponse.FromString(data))

    async def open_stream(self) -> Stream:
        return _LeanStream(self, self._stream())

    async def close(self) -> None:
        await self._channel.close()


class _LeanStream(Stream):
    def __init__(self, client: LeanClient, call: Any) -> None:
        self._client = client
        self._call = call

    async def send(self) -> None:
        try:
            await self._call.write(self._client._payload)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            code = _code(exc) if isinstance(exc, grpc.aio.AioRpcError) else "CANCELLED"
            raise RequestFailed(code, str(exc), fatal=True) from None

    async def recv(self) -> None:
        try:
            data = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise RequestFailed(_code(exc), exc.details() or "", fatal=True) from None
        if data is grpc.aio.EOF:
            raise RequestFailed("UNAVAILABLE", "the server ended the stream", fatal=True)
        # Field 1 (error_message) is serialized first and only when set: tag byte 0x0A.
        if data[:1] == b"\x0a" or not self._client._checked:
            response = self._client._pb.ModelStreamInferResponse.FromString(data)
            if response.error_message:
                raise RequestFailed(IN_BAND, response.error_message)
            self._client.check(response.infer_response)

    async def close(self) -> None:
        try:
            await self._call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass
        self._call.cancel()


def _triton_code(exc: Exception) -> str:
    status = getattr(exc, "status", lambda: None)()
    if status:
        return str(status).removeprefix("StatusCode.")
    return IN_BAND


class TritonClient(Client):
    """tritonclient.grpc.aio.InferenceServerClient, one per load process."""

    def __init__(self, url: str, model: ModelSpec) -> None:
        import tritonclient.grpc.aio as triton

        self._triton = triton
        self._model = model
        self._client = triton.InferenceServerClient(url, channel_args=CHANNEL_OPTIONS)
        self._data = model.sample(1)

    def inputs(self) -> list[Any]:
        tensor = self._triton.InferInput(INPUT, list(self._data.shape), "FP32")
        tensor.set_data_from_numpy(self._data)
        return [tensor]

    async def unary(self, timeout: float) -> None:
        try:
            result = await self._client.infer(
                self._model.name, self.inputs(), client_timeout=timeout
            )
        except Exception as exc:  # InferenceServerException, with a status string
            raise RequestFailed(_triton_code(exc), str(exc)) from None
        if result.as_numpy(OUTPUT) is None:
            raise RequestFailed(INVALID, "no OUTPUT0 in the response")

    async def open_stream(self) -> Stream:
        return _TritonStream(self)

    async def close(self) -> None:
        await self._client.close()


class _TritonStream(Stream):
    def __init__(self, client: TritonClient) -> None:
        self._client = client
        self._queue: asyncio.Queue[dict | None] = asyncio.Queue()
        self._responses = client._client.stream_infer(self._requests())

    async def _requests(self) -> Any:
        while (item := await self._queue.get()) is not None:
            yield item

    async def send(self) -> None:
        self._queue.put_nowait(
            {"model_name": self._client._model.name, "inputs": self._client.inputs()}
        )

    async def recv(self) -> None:
        try:
            result, error = await self._responses.__anext__()
        except StopAsyncIteration:
            raise RequestFailed("UNAVAILABLE", "the server ended the stream", fatal=True) from None
        except Exception as exc:
            raise RequestFailed(_triton_code(exc), str(exc), fatal=True) from None
        if error is not None:
            raise RequestFailed(_triton_code(error), str(error))
        if result.as_numpy(OUTPUT) is None:
            raise RequestFailed(INVALID, "no OUTPUT0 in the response")

    async def close(self) -> None:
        self._queue.put_nowait(None)
        cancel = getattr(self._responses, "cancel", None)
        if cancel is not None:
            cancel()


_HTTP_STATUS_CODES = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED"}
_HTTP_STATUS_CODES |= {500: "INTERNAL", 501: "UNIMPLEMENTED", 503: "UNAVAILABLE"}
_HTTP_STATUS_CODES |= {504: "DEADLINE_EXCEEDED"}


class RestClient(Client):
    """One aiohttp session (a connection per concurrent request) posting a pre-built body:
    a JSON header asking for binary outputs, then the input's raw bytes."""

    def __init__(self, url: str, model: ModelSpec) -> None:
        import json

        import aiohttp

        self._aiohttp = aiohttp
        self._model = model
        tensor = {
            "name": INPUT,
            "datatype": "FP32",
            "shape": [1, *model.input_dims],
            "parameters": {"binary_data_size": model.input_bytes},
        }
        header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}})
        self._body = header.encode() + model.sample(1).tobytes()
        self._headers = {"Inference-Header-Content-Length": str(len(header))}
        self._url = f"http://{url}/v2/models/{model.name}/infer"
        self._session: Any = None
        self._checked = False

    async def unary(self, timeout: float) -> None:
        aiohttp = self._aiohttp
        if self._session is None:  # made inside the running loop
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        try:
            async with self._session.post(
                self._url,
                data=self._body,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as reply:
                body = await reply.read()
                status = reply.status
        except TimeoutError:
            raise RequestFailed("DEADLINE_EXCEEDED", "client timeout") from None
        except aiohttp.ClientError as exc:
            raise RequestFailed("UNAVAILABLE", str(exc)) from None
        if status != 200:
            raise RequestFailed(_HTTP_STATUS_CODES.get(status, f"HTTP_{status}"), body[:200])
        if not self._checked:
            self.check(body, reply.headers)

    def check(self, body: bytes, headers: Any) -> None:
        """The first answer must be OUTPUT0 of the model's size, in binary."""
        import json

        length = int(headers.get("Inference-Header-Content-Length", -1))
        header = json.loads(body[:length]) if length > 0 else {}
        outputs = header.get("outputs") or [{}]
        want = 4 * int(np.prod(self._model.output_dims))
        if outputs[0].get("name") != OUTPUT or len(body) - length != want:
            raise RequestFailed(INVALID, f"unexpected response {body[:200]!r}")
        self._checked = True

    async def open_stream(self) -> Stream:
        raise ValueError("REST has no streams: use --mode unary with the rest client")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class RawHttpClient(RestClient):
    """The raw body of one item, posted to the FastAPI peer's `/<model>`; the answer is the
    output's raw bytes, checked for size once."""

    def __init__(self, url: str, model: ModelSpec) -> None:
        super().__init__(url, model)
        self._body = model.sample(1).tobytes()
        self._headers = {"Content-Type": "application/octet-stream"}
        self._url = f"http://{url}/{model.name}"

    def check(self, body: bytes, headers: Any) -> None:
        want = 4 * int(np.prod(self._model.output_dims))
        if len(body) != want:
            raise RequestFailed(INVALID, f"expected {want} bytes, got {body[:200]!r}")
        self._checked = True

    async def open_stream(self) -> Stream:
        raise ValueError("the raw HTTP peer has no streams: use --mode unary")


class JsonHttpClient(RawHttpClient):
    """One item as BentoML's JSON for an ndarray argument, posted to the BentoML peer's
    `/<model>`; the first answer is parsed and checked for shape."""

    def __init__(self, url: str, model: ModelSpec) -> None:
        import json

        super().__init__(url, model)
        self._body = json.dumps({"x": model.sample(1).tolist()}).encode()
        self._headers = {"Content-Type": "application/json"}

    def check(self, body: bytes, headers: Any) -> None:
        import json

        try:
            answer = np.asarray(json.loads(body), dtype=np.float32)
        except ValueError:
            raise RequestFailed(INVALID, f"not a JSON array: {body[:200]!r}") from None
        if answer.shape != (1, *self._model.output_dims):
            raise RequestFailed(INVALID, f"unexpected shape {answer.shape}: {body[:200]!r}")
        self._checked = True


def make_client(kind: str, url: str, model: ModelSpec) -> Client:
    if kind == "lean":
        return LeanClient(url, model)
    if kind == "tritonclient":
        return TritonClient(url, model)
    if kind == "rest":
        return RestClient(url, model)
    if kind == "raw_http":
        return RawHttpClient(url, model)
    if kind == "json_http":
        return JsonHttpClient(url, model)
    raise ValueError(f"unknown client '{kind}'; known: {', '.join(CLIENTS)}")
