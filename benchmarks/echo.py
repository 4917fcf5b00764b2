"""The transport ceiling: minimal gRPC servers that answer ModelInfer with the input, no model.

Two frontends, both speaking enough of inference.GRPCInferenceService for our load generator,
tritonclient and perf_analyzer (ServerLive/Ready, ModelReady, ServerMetadata, ModelMetadata,
ModelConfig, ModelInfer, ModelStreamInfer):

  sync  grpc.server with a 4-thread pool
  aio   grpc.aio.server on one asyncio loop

Each request is parsed and each response built as a real server must (id echoed, one
raw_output_contents per output, triton_final_response on stream responses), so what they
measure is the protocol and transport cost a Python server cannot avoid.
Run as `python -m benchmarks echo --kind aio --port 0`: prints `READY <port>` once serving and
stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from typing import Any

import grpc

from tiffin.protos import MESSAGE_SIZE_OPTIONS

from .models import INPUT, MODELS, OUTPUT

HELP = "Serve a minimal echo server (no model) that measures the gRPC transport ceiling."

KINDS = ("sync", "aio")
SYNC_THREADS = 4
OPTIONS = MESSAGE_SIZE_OPTIONS


class EchoProtocol:
    """The responses, shared by both frontends; everything here is synchronous and cheap."""

    def __init__(self) -> None:
        from tiffin.protos import protocol

        self.pb = protocol()

    def infer(self, request: Any) -> Any:
        """Each input comes back as the output of the same position (INPUTn -> OUTPUTn)."""
        pb = self.pb
        response = pb.ModelInferResponse(
            model_name=request.model_name,
            model_version=request.model_version or "1",
            id=request.id,
        )
        for tensor in request.inputs:
            out = response.outputs.add(
                name=tensor.name.replace(INPUT[:-1], OUTPUT[:-1], 1),
                datatype=tensor.datatype,
                shape=tensor.shape,
            )
            if tensor.HasField("contents"):
                out.contents.CopyFrom(tensor.contents)
        response.raw_output_contents.extend(request.raw_input_contents)
        return response

    def stream_response(self, request: Any) -> Any:
        response = self.pb.ModelStreamInferResponse(infer_response=self.infer(request))
        response.infer_response.parameters["triton_final_response"].bool_param = True
        return response

    def model_metadata(self, name: str) -> Any:
        model = MODELS.get(name)
        if model is None:
            return None
        shape = [-1, *model.input_dims]
        response = self.pb.ModelMetadataResponse(name=name, versions=["1"], platform="echo")
        response.inputs.add(name=INPUT, datatype="FP32", shape=shape)
        response.outputs.add(name=OUTPUT, datatype="FP32", shape=shape)
        return response

    def model_config(self, name: str) -> Any:
        model = MODELS.get(name)
        if model is None:
            return None
        config = self.pb.ModelConfig(name=name, platform="echo", max_batch_size=64)
        config.input.add(name=INPUT, data_type="TYPE_FP32", dims=model.input_dims)
        config.output.add(name=OUTPUT, data_type="TYPE_FP32", dims=model.input_dims)
        return self.pb.ModelConfigResponse(config=config)

    def unary(self, method: str, request: Any) -> tuple[Any, str | None]:
        """The answer to a unary RPC, or (None, error message) for an unknown model."""
        pb = self.pb
        if method == "ModelInfer":
            return self.infer(request), None
        if method == "ServerLive":
            return pb.ServerLiveResponse(live=True), None
        if method == "ServerReady":
            return pb.ServerReadyResponse(ready=True), None
        if method == "ModelReady":
            return pb.ModelReadyResponse(ready=request.name in MODELS), None
        if method == "ServerMetadata":
            # No extensions: perf_analyzer then asks for no statistics.
            return pb.ServerMetadataResponse(name="echo", version="1"), None
        answer = (
            self.model_metadata(request.name)
            if method == "ModelMetadata"
            else self.model_config(request.name)
        )
        return answer, None if answer is not None else f"unknown model '{request.name}'"


UNARY = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelConfig",
    "ModelInfer",
)


def _handlers(echo: EchoProtocol, asynchronous: bool) -> grpc.GenericRpcHandler:
    """Generic handlers for the offered RPCs; the others are UNIMPLEMENTED by gRPC itself."""
    from tiffin.protos import SERVICE_NAME

    pb = echo.pb
    handlers = {}
    for method in pb.service.methods:
        if method.name not in UNARY and method.name != "ModelStreamInfer":
            continue
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)
        if method.name == "ModelStreamInfer":
            behaviour = _aio_stream(echo) if asynchronous else _sync_stream(echo)
            make = grpc.stream_stream_rpc_method_handler
        else:
            behaviour = (_aio_unary if asynchronous else _sync_unary)(echo, method.name)
            make = grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            behaviour,
            request_deserializer=request_cls.FromString,
            response_serializer=response_cls.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def _sync_unary(echo: EchoProtocol, name: str) -> Any:
    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        response, error = echo.unary(name, request)
        if error:
            context.abort(grpc.StatusCode.NOT_FOUND, error)
        return response

    return handler


def _sync_stream(echo: EchoProtocol) -> Any:
    def handler(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        for request in requests:
            yield echo.stream_response(request)

    return handler


def _aio_unary(echo: EchoProtocol, name: str) -> Any:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        response, error = echo.unary(name, request)
        if error:
            await context.abort(grpc.StatusCode.NOT_FOUND, error)
        return response

    return handler


def _aio_stream(echo: EchoProtocol) -> Any:
    async def handler(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        async for request in requests:
            yield echo.stream_response(request)

    return handler


def serve_sync(host: str, port: int) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=SYNC_THREADS), options=OPTIONS)
    server.add_generic_rpc_handlers((_handlers(EchoProtocol(), asynchronous=False),))
    bound = server.add_insecure_port(f"{host}:{port}")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    server.start()
    print(f"READY {bound}", flush=True)
    stop.wait()
    server.stop(1).wait()


async def serve_aio(host: str, port: int) -> None:
    server = grpc.aio.server(options=OPTIONS)
    server.add_generic_rpc_handlers((_handlers(EchoProtocol(), asynchronous=True),))
    bound = server.add_insecure_port(f"{host}:{port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    print(f"READY {bound}", flush=True)
    await stop.wait()
    await server.stop(1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", choices=KINDS, default="aio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")


def main(args: argparse.Namespace) -> int:
    if args.kind == "sync":
        serve_sync(args.host, args.port)
    else:
        asyncio.run(serve_aio(args.host, args.port))
    sys.stdout.flush()
    return 0
