"""The protocol's message classes, loaded into a private descriptor pool.

tritonclient registers Triton's `inference.*` messages in protobuf's default
descriptor pool, and generated `_pb2` modules for our own proto would collide
with them ("duplicate symbol"). So the FileDescriptorSet compiled from
`inference.proto` ships prebuilt beside it (`inference.pb`; regenerate it with
`python -m tiffin.protos.descriptors`) and is loaded into a pool of our own;
message classes come from `message_factory.GetMessageClass`. Nothing runs protoc
at run time. Names on the wire stay `inference.*`.
"""

from __future__ import annotations

import functools
from importlib import resources
from types import SimpleNamespace
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PROTO_FILE = "inference.proto"
DESCRIPTOR_SET_FILE = "inference.pb"  # built from PROTO_FILE by tiffin.protos.descriptors
SERVICE_NAME = "inference.GRPCInferenceService"
# Triton (and tritonclient) allow messages up to INT32_MAX; gRPC's own default is 4 MiB.
MAX_MESSAGE_BYTES = 2**31 - 1
MESSAGE_SIZE_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def _load_descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    """The prebuilt FileDescriptorSet shipped with the package."""
    data = resources.files("tiffin.protos").joinpath(DESCRIPTOR_SET_FILE).read_bytes()
    return descriptor_pb2.FileDescriptorSet.FromString(data)


class Protocol(SimpleNamespace):
    """Message classes by short name (`pb.ModelInferRequest`), plus the pool and service."""

    pool: descriptor_pool.DescriptorPool
    file_descriptor_set: descriptor_pb2.FileDescriptorSet

    def __getattr__(self, name: str) -> Any:  # only reached for unknown names
        raise AttributeError(f"inference.proto declares no message named {name!r}")


@functools.cache
def protocol() -> Protocol:
    """Loads the prebuilt descriptor set of inference.proto once per process into a private pool."""
    fds = _load_descriptor_set()
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
