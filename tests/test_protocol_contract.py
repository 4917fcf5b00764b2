"""Our inference.proto against the facts taken from tritonclient 2.73.0's descriptors.

Field numbers, types, labels, enum values and streaming flags are the wire contract:
any drift breaks tritonclient and perf_analyzer. The second half proves fact 13 of
PROTOCOL.md: our private descriptor pool lives beside tritonclient's default-pool
registration in one interpreter, in either import order, and both parse each other's bytes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2 as dp

from tiffin.protos import SERVICE_NAME, method_path, protocol
from tiffin.protos.descriptors import compile_descriptor_set

ROOT = Path(__file__).resolve().parent.parent
FACTS_FILE = Path(__file__).resolve().parent / "data" / "protocol_facts.json"

FT = {v: k[5:].lower() for k, v in dp.FieldDescriptorProto.Type.items()}
FL = {v: k[6:].lower() for k, v in dp.FieldDescriptorProto.Label.items()}


# --- helpers (PROTOCOL.md Appendix A) -------------------------------------------------------


def fields_of(fdp: dp.FileDescriptorProto) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = {}

    def walk(m: dp.DescriptorProto, prefix: str) -> None:
        fn = prefix + m.name
        out[fn] = [
            (
                f.name,
                f.number,
                FT[f.type],
                FL[f.label],
                f.type_name.lstrip(".") or None,
                m.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else None,
            )
            for f in m.field
        ]
        for n in m.nested_type:
            walk(n, fn + ".")

    for m in fdp.message_type:
        walk(m, fdp.package + ".")
    return out


def map_entries_of(fdp: dp.FileDescriptorProto) -> set[str]:
    out: set[str] = set()

    def walk(m: dp.DescriptorProto, prefix: str) -> None:
        fn = prefix + m.name
        if m.options.map_entry:
            out.add(fn)
        for n in m.nested_type:
            walk(n, fn + ".")

    for m in fdp.message_type:
        walk(m, fdp.package + ".")
    return out


def enums_of(fdp: dp.FileDescriptorProto) -> dict[str, list[tuple[str, int]]]:
    out: dict[str, list[tuple[str, int]]] = {}

    def add(e: dp.EnumDescriptorProto, prefix: str) -> None:
        out[prefix + e.name] = [(v.name, v.number) for v in e.value]

    def walk(m: dp.DescriptorProto, prefix: str) -> None:
        fn = prefix + m.name
        for e in m.enum_type:
            add(e, fn + ".")
        for n in m.nested_type:
            walk(n, fn + ".")

    for e in fdp.enum_type:
        add(e, fdp.package + ".")
    for m in fdp.message_type:
        walk(m, fdp.package + ".")
    return out


def _union(facts: dict, key: str) -> dict:
    merged: dict = {}
    for f in facts["files"]:
        overlap = set(merged) & set(f[key])
        assert not overlap, f"facts declare {sorted(overlap)} in two files"
        merged.update(f[key])
    return merged


@pytest.fixture(scope="module")
def facts() -> dict:
    return json.loads(FACTS_FILE.read_text())


@pytest.fixture(scope="module")
def compiled() -> dp.FileDescriptorProto:
    """inference.proto compiled by grpcio-tools' protoc, as a FileDescriptorProto."""
    fds = dp.FileDescriptorSet.FromString(compile_descriptor_set())
    files = {f.name: f for f in fds.file}
    assert list(files) == ["inference.proto"], "inference.proto should import nothing"
    return files["inference.proto"]


# --- the descriptor contract ----------------------------------------------------------------


def test_facts_cover_both_triton_proto_files(facts: dict) -> None:
    assert sorted(f["proto_file"] for f in facts["files"]) == [
        "grpc_service.proto",
        "model_config.proto",
    ]


def test_package_and_syntax_match(compiled: dp.FileDescriptorProto, facts: dict) -> None:
    assert compiled.package == "inference"
    assert {f["package"] for f in facts["files"]} == {"inference"}
    assert {f["syntax"] for f in facts["files"]} == {compiled.syntax or "proto2"}


def test_every_message_and_field_matches_facts(
    compiled: dp.FileDescriptorProto, facts: dict
) -> None:
    expected = {
        name: [
            (x["name"], x["number"], x["type"], x["label"], x["type_name"], x.get("oneof"))
            for x in message["fields"]
        ]
        for name, message in _union(facts, "messages").items()
    }
    got = fields_of(compiled)
    assert sorted(set(expected) - set(got)) == [], "messages missing from inference.proto"
    assert sorted(set(got) - set(expected)) == [], "messages Triton does not declare"
    mismatched = {
        name: {"ours": got[name], "triton": fields}
        for name, fields in expected.items()
        if got[name] != fields
    }
    assert mismatched == {}


def test_map_fields_are_maps(compiled: dp.FileDescriptorProto, facts: dict) -> None:
    expected = {name for name, m in _union(facts, "messages").items() if m["map_entry"]}
    assert expected, "facts list map entries (parameters maps)"
    assert map_entries_of(compiled) == expected


def test_every_enum_matches_facts(compiled: dp.FileDescriptorProto, facts: dict) -> None:
    expected = {
        name: [(v["name"], v["number"]) for v in enum["values"]]
        for name, enum in _union(facts, "enums").items()
    }
    assert "inference.DataType" in expected
    assert enums_of(compiled) == expected


def test_service_methods_match_facts(compiled: dp.FileDescriptorProto, facts: dict) -> None:
    assert [s.name for s in compiled.service] == ["GRPCInferenceService"]
    service = compiled.service[0]
    assert f"{compiled.package}.{service.name}" == facts["service"]["full_name"] == SERVICE_NAME
    got = [
        (
            m.name,
            m.input_type.lstrip("."),
            m.output_type.lstrip("."),
            m.client_streaming,
            m.server_streaming,
        )
        for m in service.method
    ]
    expected = [
        (m["name"], m["request"], m["response"], m["client_streaming"], m["server_streaming"])
        for m in facts["service"]["methods"]
    ]
    assert got == expected


def test_method_paths_match_facts(facts: dict) -> None:
    for m in facts["service"]["methods"]:
        assert method_path(m["name"]) == m["path"]


def test_protocol_exposes_every_top_level_message_and_rpc(facts: dict) -> None:
    pb = protocol()
    top_level = [name for f in facts["files"] for name in f["top_level_messages"]]
    assert top_level
    for full_name in top_level:
        cls = getattr(pb, full_name.removeprefix("inference."))
        assert cls.DESCRIPTOR.full_name == full_name
    assert [m.name for m in pb.service.methods] == [m["name"] for m in facts["service"]["methods"]]
    assert pb.enums["DataType"].values_by_name["TYPE_FP32"].number == 11
    with pytest.raises(AttributeError, match="NoSuchMessage"):
        pb.NoSuchMessage  # noqa: B018


# --- coexistence with tritonclient in one interpreter (fact 13) ----------------------------

_COEXIST = textwrap.dedent(
    """
    import sys

    if sys.argv[1] == "tritonclient-first":
        import tritonclient.grpc  # registers inference.* in the default pool
        from tiffin.protos import protocol
        pb = protocol()
    else:
        from tiffin.protos import protocol
        pb = protocol()  # our pool is built before tritonclient registers its files
        import tritonclient.grpc

    from google.protobuf import descriptor_pool, json_format
    from tritonclient.grpc import service_pb2

    pb = protocol()  # still usable (and cached) after both imports
    default = descriptor_pool.Default()
    assert pb.ModelInferRequest.DESCRIPTOR.file.pool is not default
    assert pb.ModelConfigResponse.DESCRIPTOR.file.pool is not default
    assert service_pb2.ModelInferRequest.DESCRIPTOR.file.pool is default
    assert pb.ModelInferRequest is not service_pb2.ModelInferRequest
    assert pb.ModelInferRequest.DESCRIPTOR.full_name == "inference.ModelInferRequest"

    def same(a, b):
        da = json_format.MessageToDict(a, preserving_proto_field_name=True)
        db = json_format.MessageToDict(b, preserving_proto_field_name=True)
        assert da == db, (da, db)
        assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)

    # ours -> tritonclient: a request as perf_analyzer would send it, typed contents too
    ours = pb.ModelInferRequest(model_name="identity", model_version="2", id="req-7")
    ours.parameters["triton_enable_empty_final_response"].bool_param = True
    ours.parameters["priority"].uint64_param = 2
    ours.parameters["timeout"].int64_param = 1000
    ours.parameters["note"].string_param = "x"
    a = ours.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 3])
    a.parameters["shared_memory_region"].string_param = "region0"
    a.parameters["shared_memory_byte_size"].int64_param = 24
    b = ours.inputs.add(name="INPUT1", datatype="INT32", shape=[3])
    b.contents.int_contents.extend([1, -2, 3])
    c = ours.inputs.add(name="INPUT2", datatype="BYTES", shape=[2])
    ours.outputs.add(name="OUTPUT0").parameters["classification"].int64_param = 3
    ours.raw_input_contents.append(b"\\x00\\x01\\x02\\xff")
    theirs = service_pb2.ModelInferRequest.FromString(ours.SerializeToString())
    assert theirs.model_name == "identity" and theirs.id == "req-7"
    assert list(theirs.inputs[0].shape) == [2, 3]
    assert theirs.inputs[0].parameters["shared_memory_byte_size"].int64_param == 24
    assert list(theirs.inputs[1].contents.int_contents) == [1, -2, 3]
    assert theirs.parameters["triton_enable_empty_final_response"].bool_param is True
    assert theirs.parameters["priority"].uint64_param == 2
    assert theirs.raw_input_contents == [b"\\x00\\x01\\x02\\xff"]
    same(ours, theirs)

    # tritonclient -> ours: a stream response and a model config (model_config.proto half)
    resp = service_pb2.ModelStreamInferResponse(error_message="")
    r = resp.infer_response
    r.model_name, r.model_version, r.id = "identity", "2", "req-7"
    r.parameters["triton_final_response"].bool_param = True
    r.outputs.add(name="OUTPUT0", datatype="FP32", shape=[2, 3])
    r.outputs.add(name="OUTPUT1", datatype="BYTES", shape=[0])
    r.raw_output_contents.extend([b"\\x00" * 24, b""])
    got = pb.ModelStreamInferResponse.FromString(resp.SerializeToString())
    assert got.infer_response.id == "req-7"
    assert got.infer_response.parameters["triton_final_response"].bool_param is True
    assert [o.name for o in got.infer_response.outputs] == ["OUTPUT0", "OUTPUT1"]
    assert list(got.infer_response.raw_output_contents) == [b"\\x00" * 24, b""]
    same(got, resp)

    from tritonclient.grpc import model_config_pb2
    cfg = service_pb2.ModelConfigResponse()
    m = cfg.config
    m.name, m.backend, m.max_batch_size = "identity", "onnxruntime", 8
    m.input.add(name="INPUT0", data_type=model_config_pb2.TYPE_FP32, dims=[4])
    m.output.add(name="OUTPUT0", data_type=model_config_pb2.TYPE_STRING, dims=[-1])
    m.instance_group.add(kind=model_config_pb2.ModelInstanceGroup.KIND_GPU, count=2, gpus=[0])
    m.dynamic_batching.preferred_batch_size.extend([4, 8])
    m.dynamic_batching.max_queue_delay_microseconds = 100
    m.version_policy.latest.num_versions = 2
    got = pb.ModelConfigResponse.FromString(cfg.SerializeToString())
    data_type = pb.enums["DataType"].values_by_name
    assert got.config.input[0].data_type == data_type["TYPE_FP32"].number
    assert got.config.output[0].data_type == data_type["TYPE_STRING"].number
    assert got.config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert list(got.config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert got.config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    assert got.config.version_policy.WhichOneof("policy_choice") == "latest"
    same(got, cfg)

    print("coexist-ok", sys.argv[1])
    """
)


@pytest.mark.parametrize("order", ["tritonclient-first", "tiffin-first"])
def test_private_pool_coexists_with_tritonclient(order: str) -> None:
    # A fresh interpreter per order: which module registers first is the point of the test.
    proc = subprocess.run(
        [sys.executable, "-c", _COEXIST, order], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"coexist-ok {order}"
