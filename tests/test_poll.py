"""Poll mode against a real server: models added, changed, broken and removed in the
repository are followed without a call, and a client calling throughout sees no failure."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from models import ECHO, write_repository

POLL = {"TIFFIN_MODEL_CONTROL_MODE": "poll", "TIFFIN_LOAD_MODEL": ""}


def eventually(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except InferenceServerException:
            pass
        time.sleep(0.1)
    raise AssertionError(f"not seen within {timeout} s: {what}")


def one_input() -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("INPUT0", [1, 2], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 2), np.float32))
    return [tensor]


def test_poll_mode_follows_the_repository(make_server, tmp_path: Path) -> None:
    repo = write_repository(tmp_path / "repo", {"echo": ECHO})
    server = make_server(repo, "--repository-poll-secs", "0.5", env=POLL)
    client = grpcclient.InferenceServerClient(server.url)
    assert client.is_model_ready("echo")
    calls, failures = [0], []
    stop = threading.Event()

    def keep_calling() -> None:
        caller = grpcclient.InferenceServerClient(server.url)
        while not stop.is_set():
            try:
                caller.infer("echo", one_input())
                calls[0] += 1
            except InferenceServerException as exc:
                failures.append(exc.message())

    thread = threading.Thread(target=keep_calling)
    thread.start()
    try:
        # added: written aside, then moved in
        write_repository(tmp_path / "aside", {"second": ECHO})
        shutil.move(tmp_path / "aside" / "second", repo / "second")
        eventually(lambda: client.is_model_ready("second"), "the added model ready")
        # changed while a client calls it
        (repo / "echo" / "config.yaml").write_text(
            ECHO.replace("max_batch_size: 8", "max_batch_size: 4")
        )
        eventually(
            lambda: client.get_model_config("echo").config.max_batch_size == 4,
            "the changed config served",
        )
        # broken: the old version keeps serving
        (repo / "echo" / "config.yaml").write_text("backend: [unclosed\n")
        eventually(lambda: "changed in the repository, but:" in server.log(), "the failure logged")
        assert client.is_model_ready("echo")
        # removed
        shutil.rmtree(repo / "second")
        eventually(lambda: not client.is_model_ready("second"), "the removed model unloaded")
    finally:
        stop.set()
        thread.join(30)
    assert not failures, failures[:3]
    assert calls[0] > 20
    with pytest.raises(InferenceServerException) as refused:
        client.load_model("echo")
    assert "model control mode 'poll'" in refused.value.message()
    log = server.log()
    assert "model 'second' added in the repository: loaded" in log
    assert "model 'echo' changed in the repository: loaded" in log
    assert "model 'second' removed in the repository: unloaded" in log


def test_a_version_folder_removed_under_load_drains(make_server, tmp_path: Path) -> None:
    """Two versions (latest policy: 2 serves); folder 2 removed while 16 clients call: version
    1 is loaded again and takes over, version 2's traffic drains, no request fails."""
    repo = write_repository(tmp_path / "repo", {"echo": ECHO})
    (repo / "echo" / "2").mkdir()
    server = make_server(repo, "--repository-poll-secs", "0.3", env=POLL)
    served: dict[str, int] = {}
    failures: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def keep_calling() -> None:
        caller = grpcclient.InferenceServerClient(server.url)
        while not stop.is_set():
            try:
                version = caller.infer("echo", one_input()).get_response().model_version
                with lock:
                    served[version] = served.get(version, 0) + 1
            except InferenceServerException as exc:
                failures.append(exc.message())

    threads = [threading.Thread(target=keep_calling) for _ in range(16)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        shutil.rmtree(repo / "echo" / "2")
        eventually(lambda: served.get("1", 0) > 50, "version 1 serving again")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not failures, failures[:3]
    assert served.get("2", 0) > 50, served
    assert "model 'echo' changed in the repository: loaded" in server.log()
