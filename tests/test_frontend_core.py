"""--frontend-core: the frontend's threads on one core, the models' threads on all of them.

The rule (`frontend_core`) is checked on its own; a real server started on two cpus shows
where each of its threads and its worker process may run, from /proc.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc

from models import identity, write_model
from tiffin.backends.cpu_budget import CpuBudget, frontend_core

TWO = [2, 3]


@pytest.mark.parametrize(
    ("policy", "cpus", "machine", "quota", "core"),
    [
        ("pin", TWO, 2, None, 3),  # the last of the server's cores
        ("pin", TWO, 8, 1.0, 3),  # pinned whatever the machine and quota
        ("auto", TWO, 8, None, 3),  # cores set aside for it (taskset, cpuset)
        ("auto", TWO, 2, None, None),  # the whole machine: maybe shared with other servers
        ("auto", TWO, 8, 1.5, None),  # a quota: the cores are shared
        ("auto", [5], 8, None, None),  # one core: nothing to separate
        ("pin", [5], 8, None, None),
        ("none", TWO, 8, None, None),
    ],
)
def test_the_rule(policy: str, cpus: list[int], machine: int, quota: float | None, core):
    chosen, reason = frontend_core(policy, cpus, machine, CpuBudget(len(cpus), quota))
    assert chosen == core
    assert reason  # the log says why, either way


def _allowed(pid: int) -> dict[int, str]:
    """Each thread of `pid` -> the cpus it may run on, as /proc writes them ("0-1")."""
    allowed = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        for line in status.splitlines():
            if line.startswith("Cpus_allowed_list:"):
                allowed[int(task.name)] = line.split()[1]
    return allowed


def _children(pid: int) -> list[int]:
    """The processes any thread of `pid` started (a worker is started by a pool thread)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return children


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
@pytest.mark.skipif(
    hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) < 2,
    reason="needs two cpus to place the frontend on one of them",
)
@pytest.mark.parametrize("policy", ["pin", "none"])
def test_a_server_keeps_its_frontend_on_one_core(tmp_path, make_server, policy: str):
    repo = tmp_path / "models"
    write_model(repo, "inline", "max_batch_size: 8\ninstance_group: [{kind: inline}]\n",
                {1: identity})  # fmt: skip
    write_model(repo, "worker", "max_batch_size: 8\ninstance_group: [{kind: cpu}]\n",
                {1: identity})  # fmt: skip
    two = sorted(os.sched_getaffinity(0))[:2]
    both = f"{two[0]}-{two[1]}" if two[1] == two[0] + 1 else f"{two[0]},{two[1]}"
    # Started on two cpus, as `taskset -c A,B serverctl serve` would be; the test's own
    # affinity is restored at once.
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(two))
    try:
        server = make_server(repo, "--frontend-core", policy)
    finally:
        os.sched_setaffinity(0, before)

    client = tc.InferenceServerClient(server.url)
    x = np.ones((1, 4), np.float32)
    for model in ("inline", "worker"):  # both serve, wherever their threads run
        tensor = tc.InferInput("INPUT0", [1, 4], "FP32")
        tensor.set_data_from_numpy(x)
        np.testing.assert_array_equal(client.infer(model, [tensor]).as_numpy("OUTPUT0"), x)
    # Each model's threads are sized for both cores, pinned or not.
    defaults = client.get_model_config("worker").config.parameters["thread_defaults"]
    assert "2 usable cores" in defaults.string_value

    pid = server.proc.pid
    threads = _allowed(pid)
    workers = [
        _allowed(child)[child]
        for child in _children(pid)
        if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()  # not the tracker
    ]
    assert workers == [both], workers  # the worker process: the models' cores
    if policy == "none":
        assert set(threads.values()) == {both}, threads
        assert "frontend threads: on every core the server may use" in server.log()
        return
    assert threads[pid] == str(two[1]), threads  # the first thread, and the frontend's
    frontend = [tid for tid, cpus in threads.items() if cpus == str(two[1])]
    models = [tid for tid, cpus in threads.items() if cpus == both]
    assert len(frontend) > len(models) >= 2, threads  # the inline thread loads and serves
    assert set(threads.values()) == {str(two[1]), both}, threads
    assert f"frontend threads: on cpu {two[1]}, the models' threads on cpus {both}" in (
        server.log()
    )


def test_a_thread_that_cannot_move_keeps_serving(monkeypatch, caplog):
    """A model thread whose cores are gone (a cpuset shrank) stays where it is, with a
    warning, instead of dying and leaving its model's requests unanswered."""
    from tiffin.backends import cpu_budget

    monkeypatch.setenv(cpu_budget.COMPUTE_CPUS_VARIABLE, "0,4095")  # 4095: no such cpu here

    def refuse(pid: int, cpus: set[int]) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(cpu_budget.os, "sched_setaffinity", refuse)
    cpu_budget.use_compute_cpus()  # does not raise
    assert "cannot move it to cpus 0,4095" in caplog.text
