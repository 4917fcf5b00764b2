"""Regenerates `inference.pb`, the prebuilt FileDescriptorSet that `protocol()` loads.

Servers and clients never run protoc: they load the descriptor set shipped beside
`inference.proto`. After editing `inference.proto`, regenerate it (needs grpcio-tools,
which the `test` extra installs) and commit both files:

    python -m tiffin.protos.descriptors

tests/test_descriptors.py fails while the two disagree. The output carries no source info
and is serialized deterministically, so the same proto and protoc give the same bytes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

from .messages import DESCRIPTOR_SET_FILE, PROTO_FILE

PROTO_DIR = Path(__file__).resolve().parent


def compile_descriptor_set(proto_dir: Path = PROTO_DIR) -> bytes:
    """Runs protoc (from grpcio-tools) on inference.proto; returns the serialized set."""
    from grpc_tools import protoc  # a build-time tool: never imported at run time

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / DESCRIPTOR_SET_FILE
        status = protoc.main(
            [
                "protoc",
                f"-I{proto_dir}",
                "--include_imports",  # the pool needs every file the proto imports
                f"--descriptor_set_out={out}",
                PROTO_FILE,
            ]
        )
        if status != 0:
            raise RuntimeError(f"protoc failed to compile {proto_dir / PROTO_FILE}")
        fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    for file_proto in fds.file:
        file_proto.ClearField("source_code_info")
    return fds.SerializeToString(deterministic=True)


def main() -> None:
    """Writes inference.pb next to inference.proto."""
    target = PROTO_DIR / DESCRIPTOR_SET_FILE
    target.write_bytes(compile_descriptor_set())
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
