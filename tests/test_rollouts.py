"""Rollouts from a bare git repository against a real server, with a client calling
throughout: a good ref switches with no failed request, a broken ref keeps the current one
serving and the history names the failed step, and rollback returns to the ref before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

ECHO = """\
backend: toy_backends:Echo
max_batch_size: {batch}
inputs: [{{name: INPUT0, datatype: FP32, dims: [2]}}]
outputs: [{{name: OUTPUT0, datatype: FP32, dims: [2]}}]
instance_group: [{{kind: inline}}]
"""


def git(folder: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=Tests", "-c", "user.email=tests@example.com", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def commit(work: Path, models: dict[str, str], tag: str) -> None:
    for name in list(p.name for p in work.iterdir() if not p.name.startswith(".")):
        subprocess.run(["rm", "-rf", str(work / name)], check=True)
    for name, config in models.items():
        (work / name / "1").mkdir(parents=True)
        (work / name / "1" / ".keep").write_text("")
        (work / name / "config.yaml").write_text(config)
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", tag)
    git(work, "tag", tag)


def serverctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tiffin.server.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_rollout_rollback_and_history(make_server, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    git(work, "init", "-q")
    commit(work, {"echo": ECHO.format(batch=8)}, "v1")
    commit(work, {"echo": ECHO.format(batch=4), "second": ECHO.format(batch=8)}, "v2")
    commit(work, {"echo": "backend: [unclosed\n", "second": ECHO.format(batch=8)}, "broken")
    bare = tmp_path / "models.git"
    git(tmp_path, "clone", "-q", "--bare", str(work), str(bare))

    server = make_server(
        Path(f"git+file://{bare}@v1"),
        env={"TIFFIN_ROLLOUT_STORE": str(tmp_path / "store")},
    )
    client = grpcclient.InferenceServerClient(server.url)
    assert client.get_model_config("echo").config.max_batch_size == 8
    calls, failures = [0], []
    stop = threading.Event()

    def keep_calling() -> None:
        caller = grpcclient.InferenceServerClient(server.url)
        tensor = grpcclient.InferInput("INPUT0", [1, 2], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 2), np.float32))
        while not stop.is_set():
            try:
                caller.infer("echo", [tensor])
                calls[0] += 1
            except InferenceServerException as exc:
                failures.append(exc.message())

    threads = [threading.Thread(target=keep_calling) for _ in range(4)]
    for thread in threads:
        thread.start()
    remote = ("--url", server.url)
    try:
        good = serverctl("rollout", "--ref", "v2", *remote)
        assert good.returncode == 0, good.stderr
        assert "serving v2" in good.stdout
        assert client.get_model_config("echo").config.max_batch_size == 4
        assert client.is_model_ready("second")

        bad = serverctl("rollout", "--ref", "broken", *remote)
        assert bad.returncode == 1
        assert "rollout failed at step 'validate'" in bad.stderr and "echo" in bad.stderr
        assert client.get_model_config("echo").config.max_batch_size == 4

        missing = serverctl("rollout", "--ref", "no-such-ref", *remote)
        assert missing.returncode == 1 and "step 'fetch'" in missing.stderr

        back = serverctl("rollback", *remote)
        assert back.returncode == 0, back.stderr
        assert client.get_model_config("echo").config.max_batch_size == 8
        try:
            ready = client.is_model_ready("second")
        except InferenceServerException:
            ready = False
        assert not ready
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not failures, failures[:3]
    assert calls[0] > 20

    listed = serverctl("history", *remote, "--json")
    assert listed.returncode == 0, listed.stderr
    history = [(e["action"], e["ref"], e["outcome"], e["step"]) for e in json.loads(listed.stdout)]
    v1 = git(work, "rev-parse", "v1")
    assert history == [
        ("start", "v1", "ok", ""),
        ("rollout", "v2", "ok", ""),
        ("rollout", "broken", "failed", "validate"),
        ("rollout", "no-such-ref", "failed", "fetch"),
        ("rollback", v1, "ok", ""),
    ]
    table = serverctl("history", *remote)
    assert table.returncode == 0 and "validate" in table.stdout
    exports = os.listdir(next((tmp_path / "store").iterdir()) / "exports")
    assert v1 in exports
