"""The prebuilt descriptor set (protos/inference.pb) against protos/inference.proto.

Servers and clients load the shipped set and never run protoc, so an edit to the .proto
that is not followed by regenerating the set would silently serve the old contract.
"""

from __future__ import annotations

import difflib
import subprocess
import sys
import textwrap
from importlib import resources

from google.protobuf import descriptor_pb2 as dp
from google.protobuf import text_format

from tiffin.protos import protocol
from tiffin.protos.descriptors import compile_descriptor_set

REGENERATE = "python -m tiffin.protos.descriptors"


def _files(fds: dp.FileDescriptorSet) -> dict[str, dp.FileDescriptorProto]:
    out = {}
    for f in fds.file:
        f = dp.FileDescriptorProto.FromString(f.SerializeToString())
        f.ClearField("source_code_info")  # comments and line numbers are not the contract
        out[f.name] = f
    return out


def _compiled() -> dp.FileDescriptorSet:
    return dp.FileDescriptorSet.FromString(compile_descriptor_set())


def test_shipped_descriptor_set_matches_proto() -> None:
    shipped_bytes = resources.files("tiffin.protos").joinpath("inference.pb").read_bytes()
    shipped = _files(dp.FileDescriptorSet.FromString(shipped_bytes))
    compiled = _files(_compiled())
    stale = f"protos/inference.pb is out of date with protos/inference.proto; run `{REGENERATE}`"
    assert list(shipped) == list(compiled), f"{stale} (files {list(shipped)} != {list(compiled)})"
    for name, want in compiled.items():
        if shipped[name] != want:
            diff = difflib.unified_diff(
                text_format.MessageToString(shipped[name]).splitlines(),
                text_format.MessageToString(want).splitlines(),
                "shipped",
                "compiled",
                lineterm="",
            )
            raise AssertionError(f"{stale}\n" + "\n".join(list(diff)[:60]))


def test_shipped_descriptor_set_is_what_protocol_loads() -> None:
    shipped = resources.files("tiffin.protos").joinpath("inference.pb").read_bytes()
    fds = protocol().file_descriptor_set
    assert fds == dp.FileDescriptorSet.FromString(shipped)
    assert not any(f.HasField("source_code_info") for f in fds.file)


_NO_PROTOC = textwrap.dedent(
    """
    import sys

    from tiffin.protos import protocol

    pb = protocol()
    assert pb.ModelInferRequest(model_name="m").model_name == "m"
    loaded = sorted(m for m in sys.modules if m.split(".")[0] == "grpc_tools")
    assert not loaded, loaded
    print("ok")
    """
)

_WITHOUT_GRPC_TOOLS = textwrap.dedent(
    """
    import sys

    sys.modules["grpc_tools"] = None  # as if grpcio-tools were not installed

    import tiffin.clients
    import tiffin.server.server
    from tiffin.protos import protocol

    assert protocol().service.full_name == "inference.GRPCInferenceService"
    print("ok")
    """
)


def _run(script: str) -> None:
    # A fresh interpreter: what gets imported is the point.
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "ok"


def test_protocol_does_not_import_grpc_tools() -> None:
    _run(_NO_PROTOC)


def test_server_and_client_import_without_grpc_tools() -> None:
    _run(_WITHOUT_GRPC_TOOLS)
