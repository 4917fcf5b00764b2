"""The protocol's message classes, loaded into a private descriptor pool.

tritonclient registers Triton's `inference.*` messages in protobuf's default
descriptor pool, and generated `_pb2` modules for our own proto would collide
with them ("duplicate symbol"). So `inference.proto` is compiled at first use
into a FileDescriptorSet and loaded into a pool of our own; message classes come
from `message_factory.GetMessageClass`. Names on the wire stay `inference.*`.
"""

from __future__ import annotations

import functools
import os
import tempfile
from importlib import resources
from types import SimpleNamespace
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PROTO_FILE = "inference.proto"
SERVICE_NAME = "inference.GRPCInferenceService"
# Triton (and tritonclient) allow messages up to INT32_MAX; gRPC's own default is 4 MiB.
MAX_MESSAGE_BYTES = 2**31 - 1
MESSAGE_SIZE_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def _compile_descriptor_set() -> bytes:
    """Runs protoc (from grpcio-tools) on inference.proto and returns the FileDescriptorSet."""
    from grpc_tools import protoc  # imported late: only needed once per process

    proto_dir = resources.files("tiffin.protos")
    with resources.as_file(proto_dir) as include_dir, tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "inference.pb")
        status = protoc.main(
            ["protoc", f"-I{include_dir}", f"--descriptor_set_out={out}", PROTO_FILE]
        )
        if status != 0:
            raise RuntimeError(f"protoc failed to compile {include_dir / PROTO_FILE}")
        with open(out, "rb") as f:
            return f.read()


class Protocol(SimpleNamespace):
    """Message classes by short name (`pb.ModelInferRequest`), plus the pool and service."""

    pool: descriptor_pool.DescriptorPool
    file_descriptor_set: descriptor_pb2.FileDescriptorSet

    def __getattr__(self, name: str) -> Any:  # only reached for unknown names
        raise AttributeError(f"inference.proto declares no message named {name!r}")


@functools.cache
def protocol() -> Protocol:
    """Loads inference.proto once per process into a private pool."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(_compile_descriptor_set())
    pool = descriptor_pool.DescriptorPool()
    for file_proto in fds.file:
        pool.Add(file_proto)
    file_desc = pool.FindFileByName(PROTO_FILE)
    classes = {
        name: message_factory.GetMessageClass(desc)
        for name, desc in file_desc.message_types_by_name.items()
    }
    enums = {name: desc for name, desc in file_desc.enum_types_by_name.items()}
    return Protocol(
        pool=pool,
        file_descriptor_set=fds,
        service=file_desc.services_by_name["GRPCInferenceService"],
        enums=enums,
        **classes,
    )


def method_path(rpc: str) -> str:
    """The HTTP/2 path of an RPC, e.g. /inference.GRPCInferenceService/ModelInfer."""
    return f"/{SERVICE_NAME}/{rpc}"
