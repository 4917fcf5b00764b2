"""Thread defaults that fit the machine: an onnxruntime instance's threads follow the cores the
process may use (CPU affinity, cgroup quota), shared among the model's CPU instances and the
frontend; spinning is off where threads would share a core; explicit parameters win; the
choice shows in ModelConfig and is logged once."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.http as th

from models import identity, write_model
from tiffin.backends import Device, cpu_budget
from tiffin.backends import onnxruntime as ort_backend
from tiffin.backends.cpu_budget import (
    CpuBudget,
    cgroup_cpu_quota,
    cpu_instances,
    read_cpu_budget,
    shares_cores,
    threads_per_instance,
)
from tiffin.backends.onnxruntime import OnnxRuntimeBackend, thread_settings
from tiffin.protos.model_config import InstanceGroup, ModelConfig

NO_FILE = Path("/nonexistent/proc/self/cgroup")


# ---- usable cores: affinity ------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_usable_cores_follow_the_cpu_affinity(tmp_path):
    # Affinity set with pid 0 is the calling thread's: a thread of its own leaves the test alone.
    one_cpu = {min(os.sched_getaffinity(0))}
    seen: list[CpuBudget] = []

    def pinned() -> None:
        os.sched_setaffinity(0, one_cpu)
        seen.append(read_cpu_budget(tmp_path, NO_FILE))

    thread = threading.Thread(target=pinned)
    thread.start()
    thread.join()
    assert seen == [CpuBudget(affinity=1, quota=None)]
    assert seen[0].usable == 1
    assert read_cpu_budget(tmp_path, NO_FILE).affinity == len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("affinity", "quota", "usable"),
    [(1, None, 1), (8, None, 8), (8, 2.0, 2), (8, 2.5, 2), (8, 0.5, 1), (2, 4.0, 2)],
)
def test_usable_cores_are_the_affinity_capped_by_the_quota_rounded_down(affinity, quota, usable):
    assert CpuBudget(affinity, quota).usable == usable


def test_the_budget_describes_itself():
    assert CpuBudget(16, 1.5).describe() == (
        "1 usable core (CPU affinity 16 cpus, cgroup quota 1.5 cpus)"
    )
    assert CpuBudget(2).describe() == "2 usable cores (CPU affinity 2 cpus, cgroup quota none)"


# ---- usable cores: cgroup quota, from fake cgroup files --------------------------------------


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_cgroup_v2_cpu_max_sets_the_quota(tmp_path):
    _write(tmp_path / "cpu.max", "150000 100000\n")
    assert cgroup_cpu_quota(tmp_path, NO_FILE) == 1.5
    budget = CpuBudget(8, cgroup_cpu_quota(tmp_path, NO_FILE))
    assert budget.usable == 1


def test_cgroup_v2_max_means_no_limit(tmp_path):
    _write(tmp_path / "cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(tmp_path, NO_FILE) is None


def test_cgroup_v2_the_tightest_quota_on_the_process_path_wins(tmp_path):
    own = _write(tmp_path / "proc-self-cgroup", "0::/app.slice/tiffin.service\n")
    root = tmp_path / "cgroup"
    _write(root / "app.slice" / "tiffin.service" / "cpu.max", "max 100000\n")
    _write(root / "app.slice" / "cpu.max", "300000 100000\n")
    _write(root / "other.slice" / "cpu.max", "50000 100000\n")  # not this process's
    assert cgroup_cpu_quota(root, own) == 3.0
    _write(root / "app.slice" / "tiffin.service" / "cpu.max", "200000 100000\n")
    assert cgroup_cpu_quota(root, own) == 2.0
    _write(root / "cpu.max", "100000 100000\n")
    _write(own, "0::/../app.slice\n")  # a path out of the root is not followed: the root only
    assert cgroup_cpu_quota(root, own) == 1.0


def test_cgroup_v1_cfs_quota_and_period_set_the_quota(tmp_path):
    # A container's view: /proc/self/cgroup names the host's path, the mount is the container's.
    own = _write(tmp_path / "proc-self-cgroup", "4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n")
    root = tmp_path / "cgroup"
    _write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "200000\n")
    _write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(root, own) == 2.0
    _write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    assert cgroup_cpu_quota(root, own) is None


def test_cgroup_v1_plain_cpu_mount(tmp_path):
    _write(tmp_path / "cpu" / "cpu.cfs_quota_us", "50000")
    _write(tmp_path / "cpu" / "cpu.cfs_period_us", "100000")
    assert cgroup_cpu_quota(tmp_path, NO_FILE) == 0.5
    assert CpuBudget(4, cgroup_cpu_quota(tmp_path, NO_FILE)).usable == 1


@pytest.mark.parametrize(
    "files",
    [
        {},
        {"cpu.max": ""},
        {"cpu.max": "lots 100000"},
        {"cpu.max": "100000 0"},
        {"cpu/cpu.cfs_quota_us": "100000"},  # no period beside it
        {"cpu/cpu.cfs_quota_us": "x", "cpu/cpu.cfs_period_us": "100000"},
    ],
)
def test_absent_or_unreadable_cgroup_files_mean_no_limit(tmp_path, files):
    for name, text in files.items():
        _write(tmp_path / name, text)
    assert cgroup_cpu_quota(tmp_path, NO_FILE) is None
    assert cgroup_cpu_quota(tmp_path / "absent", NO_FILE) is None


def test_this_machine_reads_without_error():
    budget = read_cpu_budget()
    assert budget.usable >= 1 and budget.affinity >= 1


# ---- the rule ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usable", "instances", "threads"),
    [(1, 1, 1), (1, 4, 1), (2, 1, 1), (3, 1, 2), (4, 1, 3), (8, 2, 3), (8, 8, 1), (16, 3, 5)],
)
def test_threads_per_instance_leave_a_core_to_the_frontend(usable, instances, threads):
    assert threads_per_instance(usable, instances) == threads


@pytest.mark.parametrize(
    ("usable", "instances", "threads", "shared"),
    [(1, 1, 1, True), (2, 1, 1, False), (2, 1, 2, True), (8, 1, 7, False), (8, 2, 4, True)],
)
def test_threads_share_cores_when_instances_and_the_frontend_outnumber_them(
    usable, instances, threads, shared
):
    assert shares_cores(usable, instances, threads) is shared


def test_cpu_instances_count_cpu_inline_and_auto_groups():
    groups = [
        InstanceGroup(kind="cpu", count=2),
        InstanceGroup(kind="inline"),
        InstanceGroup(kind="auto", count=3),
        InstanceGroup(kind="gpu", count=4),
    ]
    assert cpu_instances(groups) == 6
    assert cpu_instances([InstanceGroup(kind="gpu")]) == 1


def _settings(budget: CpuBudget, **fields) -> tuple[dict, str]:
    return thread_settings(ModelConfig(name="cnn", **fields), budget)


def test_one_core_gets_one_thread_without_spinning():
    params, sentence = _settings(CpuBudget(1))
    assert params["intra_op_thread_count"] == "1"
    assert params["allow_spinning"] == "0"
    assert "inter_op_thread_count" not in params  # sequential execution does not use it
    assert params["thread_defaults"] == (
        "intra_op_thread_count, allow_spinning chosen by Tiffin: 1 usable core "
        "(CPU affinity 1 cpu, cgroup quota none), shared by 1 CPU instance and the server"
    )
    assert sentence == (
        "model 'cnn': 1 intra-op thread per instance (1 usable core, 1 instance), spinning off"
    )


def test_cores_are_shared_among_the_cpu_instances():
    groups = [InstanceGroup(kind="cpu", count=2)]
    params, sentence = _settings(CpuBudget(8), instance_group=groups)
    assert params["intra_op_thread_count"] == "3"
    assert params["allow_spinning"] == "1"  # 2 x 3 threads + the frontend fit 8 cores
    assert "(8 usable cores, 2 instances), spinning on" in sentence
    params, _ = _settings(CpuBudget(16, 2.0), instance_group=groups)
    assert params["intra_op_thread_count"] == "1"  # the quota, not the affinity
    assert params["allow_spinning"] == "0"


def test_gpu_instances_use_the_same_rule_for_their_cpu_side_pool():
    params, _ = _settings(CpuBudget(4), instance_group=[InstanceGroup(kind="gpu", count=2)])
    assert params["intra_op_thread_count"] == "3"


def test_parallel_execution_gets_inter_op_threads_too():
    params, sentence = _settings(CpuBudget(4), parameters={"execution_mode": "parallel"})
    assert params["intra_op_thread_count"] == "3" and params["inter_op_thread_count"] == "3"
    assert params["allow_spinning"] == "0"  # 3 + 3 threads and the frontend exceed 4 cores
    assert "3 intra-op threads, 3 inter-op threads per instance" in sentence


def test_explicit_parameters_win():
    params, sentence = _settings(CpuBudget(1), parameters={"intra_op_thread_count": 4})
    assert params["intra_op_thread_count"] == 4
    assert params["allow_spinning"] == "0"  # still chosen: 4 threads on one core
    assert params["thread_defaults"].startswith("allow_spinning chosen by Tiffin")
    assert sentence.endswith("; from the config: intra_op_thread_count")

    given = {"intra_op_thread_count": 0, "allow_spinning": True, "thread_defaults": "stale"}
    params, sentence = _settings(CpuBudget(1), parameters=given)
    assert params == {"intra_op_thread_count": 0, "allow_spinning": True}
    assert sentence == ""

    given = {"execution_mode": "parallel", "inter_op_thread_count": "2", "allow_spinning": "0"}
    params, _ = _settings(CpuBudget(8), parameters=given)
    assert params["inter_op_thread_count"] == "2" and params["allow_spinning"] == "0"
    assert params["intra_op_thread_count"] == "7"


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"intra_op_thread_count": "many"}, "parameters.intra_op_thread_count must be a whole"),
        ({"intra_op_thread_count": -1}, "parameters.intra_op_thread_count must be a whole"),
        ({"inter_op_thread_count": True}, "parameters.inter_op_thread_count must be a whole"),
        ({"allow_spinning": "sometimes"}, "parameters.allow_spinning must be 1 or 0"),
    ],
)
def test_malformed_thread_parameters_are_named(parameters, message):
    with pytest.raises(ValueError, match=message):
        _settings(CpuBudget(2), parameters=parameters)


# ---- the backend: completed config, one log line, the session's options --------------------


@pytest.fixture
def one_core(monkeypatch):
    """The backend sees a one-core budget whatever the machine."""
    monkeypatch.setattr(ort_backend, "read_cpu_budget", lambda: CpuBudget(1))
    monkeypatch.setattr(cpu_budget, "_announced", {})


def test_complete_config_fills_in_and_logs_once(tmp_path, one_core, caplog):
    model = identity(tmp_path / "1" / "model.onnx")
    config = ModelConfig(name="ident")
    with caplog.at_level(logging.INFO, logger="tiffin.backends.cpu_budget"):
        completed = OnnxRuntimeBackend.complete_config(config, model)
        again = OnnxRuntimeBackend.complete_config(config, model)  # a repository poll
    assert completed == again
    assert completed.parameters["intra_op_thread_count"] == "1"
    assert completed.parameters["allow_spinning"] == "0"
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "model 'ident': 1 intra-op thread per instance (1 usable core, 1 instance), spinning off"
    ]


def test_complete_config_names_a_bad_thread_parameter(tmp_path, one_core):
    model = identity(tmp_path / "1" / "model.onnx")
    config = ModelConfig(name="ident", parameters={"allow_spinning": "yes"})
    with pytest.raises(ValueError, match="parameters.allow_spinning must be 1 or 0"):
        OnnxRuntimeBackend.complete_config(config, model)


@pytest.mark.parametrize(
    ("parameters", "threads", "spinning"),
    [({}, 1, "0"), ({"intra_op_thread_count": 2, "allow_spinning": 1}, 2, "1")],
)
def test_the_session_gets_the_settings(tmp_path, one_core, parameters, threads, spinning):
    model = identity(tmp_path / "1" / "model.onnx")
    config = ModelConfig(name="ident", parameters=parameters)
    completed = OnnxRuntimeBackend.complete_config(config, model)
    for loaded_with in (completed, config):  # a config that skipped completion gets the rule
        backend = OnnxRuntimeBackend()
        backend.load(loaded_with, tmp_path / "1", Device("cpu"))
        options = backend._session.get_session_options()
        assert options.intra_op_num_threads == threads
        for pool in ("intra_op", "inter_op"):
            assert options.get_session_config_entry(f"session.{pool}.allow_spinning") == spinning
        x = np.ones((2, 4), np.float32)
        np.testing.assert_array_equal(backend.infer({"INPUT0": x}, ["OUTPUT0"])["OUTPUT0"], x)
        backend.unload()


# ---- a real server ---------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_model_config_shows_the_chosen_threads(tmp_path, make_server):
    repo = tmp_path / "models"
    write_model(repo, "auto", "max_batch_size: 8\ninstance_group: [{kind: cpu}]\n", {1: identity})
    write_model(
        repo,
        "given",
        "max_batch_size: 8\nparameters: {intra_op_thread_count: 2}\n",
        {1: identity},
    )
    # Started on one cpu, as `taskset -c 1 serverctl serve` would be: the server and its
    # workers inherit the affinity; the test's own is restored at once.
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        server = make_server(repo)
    finally:
        os.sched_setaffinity(0, before)

    params = tc.InferenceServerClient(server.url).get_model_config("auto").config.parameters
    assert params["intra_op_thread_count"].string_value == "1"
    assert params["allow_spinning"].string_value == "0"
    assert "chosen by Tiffin: 1 usable core" in params["thread_defaults"].string_value
    given = tc.InferenceServerClient(server.url).get_model_config("given").config.parameters
    assert given["intra_op_thread_count"].string_value == "2"
    assert given["allow_spinning"].string_value == "0"
    assert given["thread_defaults"].string_value.startswith("allow_spinning chosen by Tiffin")

    rest = th.InferenceServerClient(server.http_url).get_model_config("auto")
    assert rest["parameters"]["intra_op_thread_count"] == {"string_value": "1"}

    x = np.ones((1, 4), np.float32)
    tensor = tc.InferInput("INPUT0", [1, 4], "FP32")
    tensor.set_data_from_numpy(x)
    result = tc.InferenceServerClient(server.url).infer("auto", [tensor])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x)
    log = server.log()
    line = "model 'auto': 1 intra-op thread per instance (1 usable core, 1 instance), spinning off"
    assert log.count(line) == 1, log
