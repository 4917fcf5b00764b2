"""Bundles (issue 16): `serverctl build`, `serve --bundle`, `serverctl bundles`.

A bundle is built only from a repository that validates, the same bytes every time; serving
it checks every file's hash first and refuses a changed byte or a hostile archive, naming the
entry; served, it answers as the repository it was built from.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc

from conftest import EXAMPLES, ServerProcess, _python_path, free_port
from tiffin.bundles.archive import BundleError, Limits, unpack, write_archive
from tiffin.bundles.manifest import content_hash, sha256_bytes, sha256_file
from tiffin.bundles.store import BundleStore


def serverctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tiffin.server.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A bundle store of the test's own, for this process and the commands it starts."""
    root = tmp_path / "store"
    monkeypatch.setenv("TIFFIN_BUNDLE_STORE", str(root))
    return root


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """Three example models (onnxruntime and python), one with a requirements.txt."""
    repo = tmp_path / "models"
    for name in ("classifier", "uppercase", "parse_measurements"):
        shutil.copytree(EXAMPLES / name, repo / name)
    (repo / "parse_measurements" / "requirements.txt").write_text("pyyaml>=6  # parses\n")
    return repo


def build(repo: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    done = serverctl("build", str(repo), "--output", str(output), *extra)
    assert done.returncode == 0, done.stderr
    return done


def members(bundle: Path) -> dict[str, bytes]:
    with tarfile.open(bundle, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


def test_rebuild_is_byte_identical(repository: Path, tmp_path: Path, store: Path) -> None:
    first = tmp_path / "first.tar.gz"
    build(repository, first, "--name", "demo", "--tag", "v1")
    # Another day, other file times: the same content gives the same bytes.
    for path in repository.rglob("*"):
        os.utime(path, (1_700_000_000, 1_700_000_000))
    second = tmp_path / "second.tar.gz"
    build(repository, second, "--name", "demo", "--tag", "v1")
    assert first.read_bytes() == second.read_bytes()
    with tarfile.open(first, "r:gz") as tar:
        infos = tar.getmembers()
    assert [m.name for m in infos] == sorted(m.name for m in infos)
    assert {(m.uid, m.gid, m.mode, m.mtime) for m in infos} == {(0, 0, 0o644, 946684800)}
    assert first.read_bytes()[4:8] == b"\0\0\0\0"  # gzip header: no timestamp


def test_manifest_and_lock(repository: Path, tmp_path: Path, store: Path) -> None:
    bundle = tmp_path / "b.tar.gz"
    build(repository, bundle, "--name", "demo")
    files = members(bundle)
    manifest = json.loads(files["manifest.json"])
    assert manifest["name"] == "demo"
    assert manifest["tag"] == manifest["content_hash"][:12]  # no --tag: the hash names it
    assert manifest["backends"] == ["onnxruntime", "python"]
    assert manifest["python"] == ".".join(map(str, sys.version_info[:3]))
    assert manifest["tiffin"] == metadata.version("tiffin")
    assert manifest["source"] is None  # tmp_path is not in git
    model = repository / "classifier" / "2" / "model.onnx"
    assert manifest["files"]["repository/classifier/2/model.onnx"] == sha256_file(model)
    assert set(manifest["files"]) == set(files) - {"manifest.json"}
    assert manifest["content_hash"] == content_hash(manifest["files"])
    lock = files["requirements.lock"].decode().splitlines()
    for name in ("tiffin", "onnxruntime", "pyyaml", "grpcio", "numpy"):
        assert f"{name}=={metadata.version(name)}" in lock
    assert "torch" not in {line.split("==")[0] for line in lock}  # no model uses it
    names = [line.split("==")[0] for line in lock]
    assert names == sorted(names)


def test_source_commit_recorded(repository: Path, tmp_path: Path, store: Path) -> None:
    git = ["git", "-C", str(repository), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "models"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    bundle = tmp_path / "b.tar.gz"
    build(repository, bundle)
    manifest = json.loads(members(bundle)["manifest.json"])
    assert manifest["source"] == {"commit": commit.strip(), "dirty": False}


def test_build_from_a_git_ref(repository: Path, tmp_path: Path, store: Path) -> None:
    # The repository is a folder inside a checkout, as in most projects.
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "models"], check=True)
    subprocess.run([*git, "commit", "-qm", "models"], check=True)
    clean = tmp_path / "clean.tar.gz"
    build(repository, clean, "--tag", "v1")
    config = repository / "uppercase" / "config.yaml"
    config.write_text(config.read_text() + "# not committed\n")
    shutil.rmtree(repository / "classifier" / "2")
    worktree = tmp_path / "worktree.tar.gz"
    build(repository, worktree, "--tag", "v1")
    assert json.loads(members(worktree)["manifest.json"])["source"]["dirty"] is True
    from_ref = tmp_path / "ref.tar.gz"
    build(repository, from_ref, "--tag", "v1", "--git-ref", "HEAD")
    # The commit's files, whatever the working tree holds now.
    assert from_ref.read_bytes() == clean.read_bytes()
    assert worktree.read_bytes() != clean.read_bytes()
    done = serverctl("build", str(repository), "--output", str(tmp_path / "x"), "--git-ref", "nope")
    assert done.returncode == 1 and "--git-ref nope is not a commit, branch or tag" in done.stderr


def test_only_a_repository_that_validates_is_built(
    repository: Path, tmp_path: Path, store: Path
) -> None:
    (repository / "classifier" / "config.yaml").write_text("max_batch_size: many\n")
    output = tmp_path / "b.tar.gz"
    done = serverctl("build", str(repository), "--output", str(output))
    assert done.returncode == 1
    assert "does not validate, so it cannot be built" in done.stderr
    assert "classifier/config.yaml" in done.stderr
    assert not output.exists() and not store.exists()


def test_unlockable_requirement_refused(repository: Path, tmp_path: Path, store: Path) -> None:
    (repository / "parse_measurements" / "requirements.txt").write_text("no-such-dist-xyz==1\n")
    output = tmp_path / "b.tar.gz"
    done = serverctl("build", str(repository), "--output", str(output))
    assert done.returncode == 1
    assert "needs no-such-dist-xyz==1, which is not installed here" in done.stderr
    assert "parse_measurements/requirements.txt" in done.stderr
    assert not output.exists()


def _tampered(bundle: Path, target: Path, entry: str) -> Path:
    """`bundle` with one byte of `entry` changed, its manifest left as it was."""
    files = members(bundle)
    data = bytearray(files[entry])
    data[len(data) // 2] ^= 0x01
    files[entry] = bytes(data)
    write_archive(target, files.items())
    return target


def test_changed_byte_refused_at_serve(
    repository: Path, tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = tmp_path / "b.tar.gz"
    build(repository, bundle)
    bad = _tampered(bundle, tmp_path / "bad.tar.gz", "repository/classifier/1/model.onnx")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    port = str(free_port())
    done = serverctl(
        "serve", "--bundle", str(bad), "--grpc-port", port, env={"TMPDIR": str(scratch)}
    )
    assert done.returncode == 1
    assert done.stderr.startswith(f"serverctl serve: error: bundle {bad}: ")
    assert "repository/classifier/1/model.onnx does not match its sha256 in the manifest" in (
        done.stderr
    )
    assert list(scratch.iterdir()) == []  # what was unpacked is gone


def _hostile(path: Path, *entries: tuple[tarfile.TarInfo, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in entries:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def _entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


SMALL = Limits(max_entries=5, max_file_bytes=1 << 20)


@pytest.mark.parametrize(
    ("entries", "said", "limits"),
    [
        ([_entry("/etc/cron.d/x")], "is an absolute path", SMALL),
        ([_entry("repository/../../escape")], "leads out of the bundle", SMALL),
        ([_entry("repository/m/link", tarfile.SYMTYPE, "/etc/passwd")], "is a link", SMALL),
        ([_entry("repository/m/hard", tarfile.LNKTYPE, "/etc/passwd")], "is a link", SMALL),
        ([_entry("repository/m/fifo", tarfile.FIFOTYPE)], "is not a regular file", SMALL),
        ([_entry("elsewhere.txt")], "is outside the bundle's layout", SMALL),
        ([_entry("repository/./m")], "is not a normal path", SMALL),
        ([_entry("repository/a"), _entry("repository/a")], "appears twice", SMALL),
        ([_entry(f"repository/m{i}") for i in range(6)], "holds more than 5 entries", SMALL),
        ([_entry("repository/big")], "above the limit of 8", Limits(max_file_bytes=8)),
        ([_entry("repository/m/config.yaml")], "has no manifest.json", SMALL),
    ],
)
def test_hostile_archive_refused_before_writing(
    entries: list[tarfile.TarInfo],
    said: str,
    limits: Limits,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where unpack's folder goes
    bundle = _hostile(tmp_path / "hostile.tar.gz", *((e, b"0123456789") for e in entries))
    with pytest.raises(BundleError, match=said):
        unpack(bundle, limits=limits)
    assert list(scratch.iterdir()) == []
    assert not Path("/etc/cron.d/x").exists() and not (tmp_path.parent / "escape").exists()


def test_file_not_in_manifest_refused(repository: Path, tmp_path: Path, store: Path) -> None:
    bundle = tmp_path / "b.tar.gz"
    build(repository, bundle)
    files = members(bundle)
    files["repository/classifier/3/model.onnx"] = files["repository/classifier/2/model.onnx"]
    write_archive(tmp_path / "extra.tar.gz", files.items())
    with pytest.raises(BundleError, match="3/model.onnx is not listed in the manifest"):
        unpack(tmp_path / "extra.tar.gz")


def test_folder_not_in_manifest_refused(repository: Path, tmp_path: Path, store: Path) -> None:
    bundle = tmp_path / "b.tar.gz"
    build(repository, bundle)
    files: dict[str, bytes | None] = dict(members(bundle))
    files["repository/classifier/7"] = None  # an empty version folder, smuggled in
    write_archive(tmp_path / "extra.tar.gz", files.items())
    with pytest.raises(BundleError, match="classifier/7 is not listed in the manifest"):
        unpack(tmp_path / "extra.tar.gz")


class BundleServer(ServerProcess):
    """`serverctl serve --bundle REFERENCE` on free loopback ports."""

    def __init__(self, reference: str, tmp: Path) -> None:
        # ServerProcess's own start names a repository; the rest of it (health wait, log,
        # stop) serves as it is.
        self.credentials = None
        self.port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.log_path = tmp / f"serve-{self.port}.log"
        self._log = open(self.log_path, "w+b")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tiffin.server.cli",
                "serve",
                "--bundle",
                reference,
                *("--grpc-port", str(self.port), "--http-port", str(self.http_port)),
                *("--metrics-port", str(self.metrics_port)),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": _python_path()},
        )
        self.wait_serving()


def _answers(url: str) -> dict[str, np.ndarray]:
    client = tc.InferenceServerClient(url)
    features = np.random.default_rng(7).standard_normal((3, 4)).astype(np.float32)
    tensor = tc.InferInput("features", [3, 4], "FP32")
    tensor.set_data_from_numpy(features)
    text = tc.InferInput("text", [2], "BYTES")
    text.set_data_from_numpy(np.array([b"bundle", b"me"], dtype=object))
    measurements = (
        b'{"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}'
    )
    json_in = tc.InferInput("json", [1, 1], "BYTES")
    json_in.set_data_from_numpy(np.array([[measurements]], dtype=object))
    return {
        "classifier v1": client.infer("classifier", [tensor], model_version="1").as_numpy(
            "probabilities"
        ),
        "classifier": client.infer("classifier", [tensor]).as_numpy("probabilities"),
        "uppercase": client.infer("uppercase", [text]).as_numpy("upper"),
        "parse_measurements": client.infer("parse_measurements", [json_in]).as_numpy("features"),
        "index": np.array(
            sorted((m.name, m.version, m.state) for m in client.get_model_repository_index().models)
        ),
    }


def test_served_bundle_answers_as_the_repository(
    repository: Path, tmp_path: Path, store: Path, make_server
) -> None:
    bundle = tmp_path / "b.tar.gz"
    build(repository, bundle, "--name", "demo", "--tag", "v1")
    direct = _answers(make_server(repository).url)
    for reference in (str(bundle), "demo:v1"):  # the file, and its tag in the store
        served = BundleServer(reference, tmp_path)
        try:
            found = _answers(served.url)
            assert "demo:v1 (sha256 " in served.log()
        finally:
            assert served.stop() == 0, served.log_path.read_text()
        assert direct.keys() == found.keys()
        for key in direct:
            np.testing.assert_array_equal(direct[key], found[key], err_msg=key)


def test_store_lists_and_moves_tags(repository: Path, tmp_path: Path, store: Path) -> None:
    build(repository, tmp_path / "a.tar.gz", "--name", "demo", "--tag", "prod")
    first = json.loads(members(tmp_path / "a.tar.gz")["manifest.json"])["content_hash"]
    (repository / "uppercase" / "config.yaml").write_text(
        (repository / "uppercase" / "config.yaml").read_text() + "\n# changed\n"
    )
    build(repository, tmp_path / "b.tar.gz", "--name", "demo", "--tag", "canary")
    second = json.loads(members(tmp_path / "b.tar.gz")["manifest.json"])["content_hash"]
    assert first != second
    listing = serverctl("bundles")
    assert listing.returncode == 0, listing.stderr
    rows = [line.split() for line in listing.stdout.splitlines()]
    assert rows[0][:3] == ["NAME", "TAG", "SHA256"]
    assert {(r[0], r[1], r[2]) for r in rows[1:]} == {
        ("demo", "prod", first[:12]),
        ("demo", "canary", second[:12]),
    }
    assert sorted(p.name for p in (store / "sha256").iterdir()) == sorted(
        [f"{first}.tar.gz", f"{second}.tar.gz"]
    )
    # Promote: the same content under prod; the store keeps one copy per content.
    build(repository, tmp_path / "c.tar.gz", "--name", "demo", "--tag", "prod")
    rows = [line.split() for line in serverctl("bundles").stdout.splitlines()[1:]]
    assert {(r[1], r[2]) for r in rows} == {("prod", second[:12]), ("canary", second[:12])}
    assert len(list((store / "sha256").iterdir())) == 2


def test_store_tampering_refused(repository: Path, tmp_path: Path, store: Path) -> None:
    build(repository, tmp_path / "a.tar.gz", "--name", "demo", "--tag", "v1")
    (kept,) = (store / "sha256").iterdir()
    # Even a bundle whose manifest was rewritten to match is not the one the store named.
    files = members(kept)
    manifest = json.loads(files["manifest.json"])
    files["repository/uppercase/config.yaml"] += b"\n"
    manifest["files"]["repository/uppercase/config.yaml"] = sha256_bytes(
        files["repository/uppercase/config.yaml"]
    )
    manifest["content_hash"] = content_hash(manifest["files"], manifest["folders"])
    files["manifest.json"] = json.dumps(manifest).encode()
    write_archive(kept, files.items())
    done = serverctl("serve", "--bundle", "demo:v1", "--grpc-port", str(free_port()))
    assert done.returncode == 1
    assert "the bundle was changed" in done.stderr


def test_serve_takes_a_repository_or_a_bundle(repository: Path, store: Path) -> None:
    both = serverctl("serve", "--bundle", "demo:v1", "--model-repository", str(repository))
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    from_env = serverctl("serve", "--bundle", "demo:v1", env={"TIFFIN_MODEL_REPOSITORY": "m"})
    assert from_env.returncode == 2 and "are both given; serve one or the other" in from_env.stderr
    neither = serverctl("serve", env={"TIFFIN_MODEL_REPOSITORY": ""})
    assert neither.returncode == 2
    assert "--model-repository or --bundle is required." in neither.stderr
    unknown = serverctl("serve", "--bundle", "demo:nope")
    assert unknown.returncode == 1
    assert "is neither a file nor a name:tag or hash in the bundle store" in unknown.stderr
    assert serverctl("bundles").stdout == f"no bundles in {store}\n"


def test_proxy_model_with_an_empty_version_folder(
    repository: Path, tmp_path: Path, store: Path, example_server
) -> None:
    """A proxy model's version folder holds nothing; the bundle keeps it, and it serves."""
    proxy = repository / "remote_classifier"
    (proxy / "1").mkdir(parents=True)
    (proxy / "config.yaml").write_text(
        f"backend: triton\nparameters:\n  url: '{example_server.url}'\n  model_name: classifier\n"
    )
    bundle = tmp_path / "b.tar.gz"
    build(repository, bundle)
    manifest = json.loads(members(bundle)["manifest.json"])
    assert manifest["folders"] == ["repository/remote_classifier/1"]
    assert manifest["content_hash"] == content_hash(manifest["files"], manifest["folders"])
    features = np.random.default_rng(5).standard_normal((2, 4)).astype(np.float32)
    tensor = tc.InferInput("features", [2, 4], "FP32")
    tensor.set_data_from_numpy(features)
    direct = tc.InferenceServerClient(example_server.url).infer("classifier", [tensor])
    served = BundleServer(str(bundle), tmp_path)
    try:
        client = tc.InferenceServerClient(served.url)
        through = client.infer("remote_classifier", [tensor])
    finally:
        assert served.stop() == 0, served.log_path.read_text()
    np.testing.assert_array_equal(
        direct.as_numpy("probabilities"), through.as_numpy("probabilities")
    )


def test_promote_and_roll_back_by_tag(repository: Path, tmp_path: Path, store: Path) -> None:
    build(repository, tmp_path / "a.tar.gz", "--name", "demo", "--tag", "v1")
    first = json.loads(members(tmp_path / "a.tar.gz")["manifest.json"])["content_hash"]
    config = repository / "uppercase" / "config.yaml"
    config.write_text(config.read_text() + "# v2\n")
    build(repository, tmp_path / "b.tar.gz", "--name", "demo", "--tag", "v2")
    second = json.loads(members(tmp_path / "b.tar.gz")["manifest.json"])["content_hash"]

    def prod() -> str:
        rows = [line.split() for line in serverctl("bundles", "--name", "demo").stdout.splitlines()]
        return next(r[2] for r in rows if r[1] == "prod")

    promoted = serverctl("bundles", "tag", "demo:v2", "demo:prod")
    assert promoted.returncode == 0 and promoted.stdout == f"demo:prod -> {second}\n"
    assert prod() == second[:12]
    assert serverctl("bundles", "tag", first[:12], "demo:prod").returncode == 0  # roll back
    assert prod() == first[:12]
    assert BundleStore().resolve("demo:prod") == (store / "sha256" / f"{first}.tar.gz", first)
    bad = serverctl("bundles", "tag", "demo:v2", "prod")
    assert bad.returncode == 1 and "'prod' must be NAME:TAG" in bad.stderr
    unknown = serverctl("bundles", "tag", "demo:v9", "demo:prod")
    assert (
        unknown.returncode == 1 and "'demo:v9' is neither a file nor a name:tag" in unknown.stderr
    )
