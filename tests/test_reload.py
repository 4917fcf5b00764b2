"""Reloading under load: traffic moves atomically to the new version, none is lost, and a
broken reload leaves the old version serving with the reason visible."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from models import identity, write_model

CLIENTS = 16
SECONDS = 20.0
CONFIG = "backend: onnxruntime\nmax_batch_size: 8\ndynamic_batching: {}\n"


def _send(client: tc.InferenceServerClient, value: float) -> np.ndarray:
    tensor = tc.InferInput("INPUT0", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.full((1, 4), value, np.float32))
    return client.infer("identity", [tensor], client_timeout=30).as_numpy("OUTPUT0")


def _index(client: tc.InferenceServerClient) -> dict[str, dict]:
    models = client.get_model_repository_index(as_json=True)["models"]
    return {m.get("version", ""): m for m in models if m["name"] == "identity"}


class Load:
    """CLIENTS threads sending requests until stopped; every answer is checked."""

    def __init__(self, url: str) -> None:
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(url, i)) for i in range(CLIENTS)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _run(self, url: str, index: int) -> None:
        client = tc.InferenceServerClient(url)
        value = float(index)
        try:
            while not self._stop.is_set():
                try:
                    out = _send(client, value)
                    good = out.tolist() == [[value] * 4]
                    with self._lock:
                        if good:
                            self.ok += 1
                        else:
                            self.failures.append(f"wrong answer {out.tolist()}")
                except InferenceServerException as exc:
                    with self._lock:
                        self.failures.append(f"{exc.status()}: {exc.message()}")
        finally:
            client.close()


def test_reload_every_second_under_load_loses_no_request(make_server, tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_model(repo, "identity", CONFIG, {1: identity})
    server = make_server(repo)
    admin = tc.InferenceServerClient(server.url)
    folder = repo / "identity"
    reloads = refused = 0
    with Load(server.url) as load:
        start = time.monotonic()
        step = 0
        while time.monotonic() - start < SECONDS or step < 16:
            step += 1
            if step == 4:  # a new version: traffic moves from 1 to 2, 1 drains and unloads
                shutil.copytree(folder / "1", folder / "2")
            if step == 8:  # a broken new version: 2 keeps serving, with the reason
                (folder / "3").mkdir()
                (folder / "3" / "model.onnx").write_bytes(b"not an onnx model")
            if step == 10:
                shutil.rmtree(folder / "3")
            if step == 12:  # a broken config.yaml: 2 keeps serving, with the reason
                (folder / "config.yaml").write_text(CONFIG + "max_batch_sise: 4\n")
            if step == 14:
                (folder / "config.yaml").write_text(CONFIG)
            began = time.monotonic()
            try:
                admin.load_model("identity")
                reloads += 1
            except InferenceServerException as exc:
                refused += 1
                assert step in (8, 9, 12, 13), exc.message()
                index = _index(admin)
                assert index["2"]["state"] == "READY"
                assert (
                    "still serving" in index["2"]["reason"]
                    or "selected no version" in (index["2"]["reason"])
                )
                if step in (8, 9):
                    assert index["3"]["state"] == "UNAVAILABLE"
                    assert "model.onnx" in index["3"]["reason"]
                else:
                    assert "max_batch_sise" in index["2"]["reason"]
                assert admin.is_model_ready("identity")
            time.sleep(max(0.0, 1.0 - (time.monotonic() - began)))
    print(f"reload under load: {load.ok} answered, {len(load.failures)} failed, {reloads} reloads")
    assert load.failures == [], f"{len(load.failures)} failed of {load.ok}: {load.failures[:5]}"
    assert load.ok > CLIENTS * SECONDS  # it really served throughout
    assert reloads >= 8 and refused == 4
    index = _index(admin)
    assert index["2"]["state"] == "READY" and index["2"].get("reason", "") == ""
    assert "1" not in index or index["1"]["state"] != "READY"
    admin.close()


@pytest.mark.parametrize("version", ["", "1"])
def test_a_failed_reload_keeps_the_old_version_answering(
    make_server, tmp_path: Path, version: str
) -> None:
    repo = tmp_path / "models"
    write_model(repo, "identity", CONFIG, {1: identity})
    server = make_server(repo)
    client = tc.InferenceServerClient(server.url)
    (repo / "identity" / "1" / "model.onnx").write_bytes(b"garbage")
    with pytest.raises(InferenceServerException) as info:
        client.load_model("identity")
    assert "failed to load 'identity'" in info.value.message()
    assert client.is_model_ready("identity", version)
    assert _send(client, 2.0).tolist() == [[2.0] * 4]
    entry = _index(client)["1"]
    assert entry["state"] == "READY" and "reload failed, still serving" in entry["reason"]
    client.close()
