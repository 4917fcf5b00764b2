"""Nothing outside the model repository is loaded because a request or a config says so:
model names on load and unload, `default_model_filename`, backends by import path, and
links out of the repository. Foreign code writes a marker file when it is imported, so each
test can prove that it never ran."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from models import ECHO, identity
from tiffin.backends import check_backend_allowed

TESTS = Path(__file__).resolve().parent


# A python model that must never run: importing it writes `marker`; it answers zeros.
FOREIGN_CONFIG = """\
backend: python
max_batch_size: 8
inputs: [{name: INPUT0, datatype: FP32, dims: [2]}]
outputs: [{name: OUTPUT0, datatype: FP32, dims: [2]}]
instance_group: [{kind: inline}]
"""
FOREIGN_MODEL = """\
import pathlib

import numpy as np

from tiffin.backends import Backend

pathlib.Path({marker!r}).write_text("imported")


class Foreign(Backend):
    def load(self, config, version_dir, device):
        pass

    def infer(self, inputs, outputs):
        return {{"OUTPUT0": np.zeros_like(inputs["INPUT0"])}}
"""

ONNX = """\
backend: onnxruntime
instance_group: [{kind: inline}]
"""


def foreign_model(folder: Path, marker: Path) -> Path:
    """A python model folder whose model.py writes `marker` when imported."""
    (folder / "1").mkdir(parents=True)
    (folder / "config.yaml").write_text(FOREIGN_CONFIG)
    (folder / "1" / "model.py").write_text(FOREIGN_MODEL.format(marker=str(marker)))
    return folder


def echo_model(repo: Path, name: str = "echo") -> Path:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.yaml").write_text(ECHO)
    return repo / name


def echo_input(values: list[float]) -> tc.InferInput:
    tensor = tc.InferInput("INPUT0", [1, 2], "FP32")
    tensor.set_data_from_numpy(np.array([values], np.float32))
    return tensor


def index(client: tc.InferenceServerClient) -> dict[tuple[str, str], dict]:
    """RepositoryIndex by (name, version)."""
    rows = client.get_model_repository_index(as_json=True).get("models", [])
    return {(row["name"], row.get("version", "")): row for row in rows}


def refusal(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def test_load_and_unload_names_that_leave_the_repository_are_invalid(make_server, tmp_path):
    repo = tmp_path / "models"
    echo_model(repo)
    marker = tmp_path / "imported"
    foreign = foreign_model(tmp_path / "outside" / "evil", marker)
    foreign_model(repo / ".hidden", marker)  # hidden: skipped at start, never loadable
    foreign_model(repo / "a" / "b", marker)  # nested: not a model folder of the repository
    server = make_server(repo)
    client = tc.InferenceServerClient(server.url)
    names = [
        "../outside/evil",
        "../" * 40 + str(foreign).lstrip("/"),  # up to / and down again
        str(foreign),
        "a/b",
        ".hidden",
        "..",
        "x" * 1_000_000,
        "echo\0",
        "echo\n",
        "",
    ]
    for name in names:
        for call in (client.load_model, client.unload_model):
            exc = refusal(lambda call=call, name=name: call(name, client_timeout=30))
            assert exc.status() == "StatusCode.INVALID_ARGUMENT", (name[:50], exc)
            assert len(exc.message()) < 400, exc.message()[:400]
            assert not marker.exists(), f"{name[:50]!r}: foreign model.py was imported"
    message = refusal(lambda: client.load_model("../outside/evil")).message()
    assert "'../outside/evil' is not a model name" in message
    assert (
        "at most 128 characters, not 1000000"
        in refusal(lambda: client.load_model("x" * 1_000_000)).message()
    )
    assert not marker.exists()
    assert client.is_model_ready("echo")


def test_a_foreign_folder_named_like_a_served_model_cannot_replace_it(make_server, tmp_path):
    repo = tmp_path / "models"
    echo_model(repo)
    marker = tmp_path / "imported"
    foreign = foreign_model(tmp_path / "outside" / "echo", marker)
    server = make_server(repo)
    client = tc.InferenceServerClient(server.url)
    for name in (str(foreign), "../outside/echo"):
        exc = refusal(lambda name=name: client.load_model(name, client_timeout=30))
        assert exc.status() == "StatusCode.INVALID_ARGUMENT", exc
    assert not marker.exists()
    result = client.infer("echo", [echo_input([3.0, 4.0])], client_timeout=30)
    assert result.as_numpy("OUTPUT0").tolist() == [[3.0, 4.0]]  # its own values, not zeros
    client.load_model("echo", client_timeout=30)  # the real one still reloads: OK, not INTERNAL
    assert client.is_model_ready("echo")


def test_default_model_filename_outside_the_version_folder_is_unavailable(make_server, tmp_path):
    repo = tmp_path / "models"
    identity(repo / "outside.onnx")  # inside the repository, outside every model folder
    identity(tmp_path / "outside.onnx")
    for name, filename in [("up", "../../outside.onnx"), ("absolute", tmp_path / "outside.onnx")]:
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.yaml").write_text(ONNX + f"default_model_filename: '{filename}'\n")
    server = make_server(repo)
    client = tc.InferenceServerClient(server.url)
    rows = index(client)
    for name in ("up", "absolute"):
        row = rows[(name, "1")]
        assert row["state"] == "UNAVAILABLE", row
        assert "default_model_filename" in row["reason"], row
        assert "must be the name of a file inside the version folder" in row["reason"], row
        exc = refusal(lambda name=name: client.infer(name, [echo_input([1.0, 2.0])]))
        assert exc.status() == "StatusCode.NOT_FOUND", exc


@pytest.fixture
def marker_module(tmp_path: Path) -> tuple[Path, Path]:
    """A module `tiffin_marker_backend` (folder, marker file) that writes the marker when
    imported and defines a valid Backend, `Marker`."""
    folder = tmp_path / "pythonpath"
    folder.mkdir()
    marker = tmp_path / "backend-imported"
    (folder / "tiffin_marker_backend.py").write_text(
        textwrap.dedent(
            f"""
            import pathlib

            from toy_backends import Echo

            pathlib.Path({str(marker)!r}).write_text("imported")


            class Marker(Echo):
                pass
            """
        )
    )
    return folder, marker


def test_backends_by_import_path_need_the_allow_list(make_server, tmp_path, marker_module):
    folder, marker = marker_module
    repo = tmp_path / "models"
    echo_model(repo)
    for name, backend in [("system", "os:system"), ("marked", "tiffin_marker_backend:Marker")]:
        echo_model(repo, name)
        config = repo / name / "config.yaml"
        config.write_text(config.read_text().replace("toy_backends:Echo", backend))
    inherited = os.environ.get("PYTHONPATH", "")
    path = os.pathsep.join(p for p in (str(TESTS), str(folder), inherited) if p)
    server = make_server(repo, env={"PYTHONPATH": path})
    client = tc.InferenceServerClient(server.url)
    rows = index(client)
    for name, module in [("system", "os"), ("marked", "tiffin_marker_backend")]:
        row = rows[(name, "")]
        assert row["state"] == "UNAVAILABLE", row
        assert "is not allowed: a backend named by import path" in row["reason"], row
        assert f"(or its module, '{module}')" in row["reason"], row
        assert "TIFFIN_ALLOWED_BACKENDS" in row["reason"], row
    assert not marker.exists(), "a backend off the allow-list was imported"
    assert rows[("echo", "1")]["state"] == "READY"  # toy_backends is allowed (conftest)

    # Allowed by name, the same module loads and serves.
    allowed = "toy_backends,tiffin_marker_backend:Marker"
    server = make_server(repo, env={"PYTHONPATH": path, "TIFFIN_ALLOWED_BACKENDS": allowed})
    client = tc.InferenceServerClient(server.url)
    assert client.is_model_ready("marked")
    assert marker.exists()
    assert index(client)[("system", "")]["state"] == "UNAVAILABLE"  # still not on the list


def test_allow_list_entries_admit_a_class_or_a_module_and_those_below_it():
    for name in ("onnxruntime", "python", "torch", "triton", "tensorflow"):
        check_backend_allowed(name)  # registered ones, or unknown names get_backend refuses
    check_backend_allowed("pkg:Class", ["pkg"])
    check_backend_allowed("pkg.sub:Class", ["pkg"])
    check_backend_allowed("pkg.sub:Class", ["other", "pkg.sub:Class"])
    for name, allowed in [
        ("pkg:Class", []),
        ("pkgx:Class", ["pkg"]),
        ("pkg:Other", ["pkg:Class"]),
        ("pkg.sub:Class", ["pkg:Class"]),
        ("os:system", ["toy_backends"]),
    ]:
        with pytest.raises(ValueError, match="is not allowed"):
            check_backend_allowed(name, allowed)
    for name in ("../evil:Class", ".relative:Class", "pkg:", ":Class", "pkg:a.b"):
        with pytest.raises(ValueError, match="is not an import path"):
            check_backend_allowed(name, ["", ".", ".relative", "pkg", "../evil"])


def test_links_out_of_a_model_folder_and_bad_folder_names_are_refused(make_server, tmp_path):
    repo = tmp_path / "models"
    outside = tmp_path / "outside"
    marker = tmp_path / "imported"
    foreign_model(outside / "model", marker)
    identity(outside / "outside.onnx")
    # A version folder that is a link out of the repository.
    (repo / "linked_version").mkdir(parents=True)
    (repo / "linked_version" / "config.yaml").write_text(ECHO)
    (repo / "linked_version" / "1").symlink_to(outside / "model" / "1")
    # A model file (model.py, which would run) that is a link out of the repository.
    (repo / "linked_file" / "1").mkdir(parents=True)
    (repo / "linked_file" / "config.yaml").write_text(FOREIGN_CONFIG)
    (repo / "linked_file" / "1" / "model.py").symlink_to(outside / "model" / "1" / "model.py")
    # A model folder may be a link (the repository's owner put it there); what is inside it
    # is then held to the folder it links to.
    (repo / "linked_model").symlink_to(echo_model(outside))
    # A folder whose name no request could ask for.
    echo_model(repo, "bad name")
    # Links that stay inside the model folder are fine: version 2 shares version 1's file.
    (repo / "shared" / "2").mkdir(parents=True)
    (repo / "shared" / "config.yaml").write_text(ONNX + "version_policy: {all: {}}\n")
    identity(repo / "shared" / "1" / "model.onnx")
    (repo / "shared" / "2" / "model.onnx").symlink_to(Path("..") / "1" / "model.onnx")
    server = make_server(repo)
    client = tc.InferenceServerClient(server.url)
    rows = index(client)

    version = rows[("linked_version", "1")]
    assert version["state"] == "UNAVAILABLE", version
    assert (
        f"{repo / 'linked_version' / '1'}: resolves to {outside / 'model' / '1'}"
        in (version["reason"])
    )
    assert "outside the model folder" in version["reason"]
    file = rows[("linked_file", "1")]
    assert file["state"] == "UNAVAILABLE", file
    assert f"{repo / 'linked_file' / '1' / 'model.py'}: resolves to" in file["reason"], file
    assert rows[("linked_model", "1")]["state"] == "READY"
    bad = rows[("bad name", "")]
    assert bad["state"] == "UNAVAILABLE", bad
    assert "'bad name' is not a model name" in bad["reason"], bad
    assert not marker.exists(), "model.py behind a link was imported"
    assert rows[("shared", "1")]["state"] == "READY"
    assert rows[("shared", "2")]["state"] == "READY"

    # Loading by name reads the same way: the link is still refused, with its reason.
    exc = refusal(lambda: client.load_model("linked_version", client_timeout=30))
    assert exc.status() == "StatusCode.INVALID_ARGUMENT"
    assert "outside the model folder" in exc.message()
    assert not marker.exists()
