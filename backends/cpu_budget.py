"""How many cores a model's instances may use, for sizing framework thread pools.

A framework left to itself sizes its pools for the whole machine. A server process is often
allowed far less: a CPU affinity (`taskset`, a cpuset) or a cgroup CPU quota (a container's
`--cpus`), shared among the model's instances and the server's own frontend. Too many threads
on too few cores fight each other, and spinning threads burn the time the others need.

The rule: `usable` = the cpus in the affinity, capped by the cgroup quota rounded down (at least
1); each CPU instance gets `max(1, (usable - 1) // instances)` threads when `usable > 1`, else 1,
leaving one core to the frontend. Other models on the same server are not counted.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tiffin.protos.model_config import InstanceGroup

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")
# Where cgroup v1 mounts the cpu controller, under the cgroup root, by distribution.
_V1_CPU_MOUNTS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


@dataclass(frozen=True)
class CpuBudget:
    """The cores this process may use: its CPU affinity, capped by its cgroup's CPU quota."""

    affinity: int
    """Cpus in the process's affinity mask."""
    quota: float | None = None
    """Cpus' worth of time per period the cgroup allows; None when it sets no limit."""

    @property
    def usable(self) -> int:
        """Whole cores: the affinity, capped by the quota rounded down; at least 1."""
        cores = self.affinity
        if self.quota is not None:
            # Rounded down: a 1.5-cpu quota runs one busy thread without throttling, not two.
            cores = min(cores, math.floor(self.quota + 1e-9))
        return max(1, cores)

    def describe(self) -> str:
        """E.g. '1 usable core (CPU affinity 2 cpus, cgroup quota 1.5 cpus)'."""
        quota = "none" if self.quota is None else f"{self.quota:g} cpus"
        return (
            f"{_plural(self.usable, 'usable core')} (CPU affinity {_plural(self.affinity, 'cpu')}"
            f", cgroup quota {quota})"
        )


def affinity_count() -> int:
    """Cpus this process may run on (all of the machine's where affinity is unknown); the
    models' cores where the frontend was placed on one of them (`place_frontend`)."""
    compute = compute_cpus()
    if compute:
        return len(compute)
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


# ---- where the frontend's threads and the models' threads run --------------------------
#
# The frontend (gRPC's threads, handler threads, the event loops, batching) runs Python and
# hands every request between threads, each hand-over passing Python's lock. On one core that
# costs a thread switch; spread over several, each hand-over wakes a thread on another core
# and the lock bounces between them, which halved a 2-core server's throughput on a small
# model. So, where the server's cores are its own, its frontend threads share one core and
# the models' threads (inline instances, worker processes, framework pools) use all of them.

# Set by `place_frontend` for the worker processes the server starts: the cores the models'
# threads may use ("0,1,...").
COMPUTE_CPUS_VARIABLE = "TIFFIN_COMPUTE_CPUS"


def compute_cpus() -> set[int]:
    """The cores the models' threads may use; empty where the frontend was not placed."""
    value = os.environ.get(COMPUTE_CPUS_VARIABLE, "")
    return {int(cpu) for cpu in value.split(",") if cpu.strip().isdigit()}


def place_frontend(policy: str) -> str:
    """Call on the serving process's first thread, before it starts any other (threads
    inherit their creator's cores). Where `frontend_core(policy, ...)` names a core, keeps
    this thread, and so the frontend threads it starts, on it, and records the models'
    cores for their threads. Returns what was done, for the log."""
    os.environ.pop(COMPUTE_CPUS_VARIABLE, None)  # this process's own choice, not inherited
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return "frontend threads: not placed (no CPU affinity on this system)"
    core, reason = frontend_core(policy, cpus, os.cpu_count() or len(cpus), read_cpu_budget())
    if core is None:
        return f"frontend threads: on every core the server may use ({reason})"
    try:
        os.sched_setaffinity(0, {core})
    except OSError as exc:  # a cpuset changed under us: serve unplaced rather than not at all
        return f"frontend threads: on every core the server may use (cannot pin: {exc})"
    os.environ[COMPUTE_CPUS_VARIABLE] = ",".join(str(cpu) for cpu in cpus)
    models = _ranges(cpus)
    return f"frontend threads: on cpu {core}, the models' threads on cpus {models} ({reason})"


def frontend_core(
    policy: str, cpus: list[int], machine_cpus: int, budget: CpuBudget
) -> tuple[int | None, str]:
    """The core to keep the frontend's threads on (None: every core), and why.

    "pin" takes one whenever there are two or more. "auto" takes one only where cores were
    set aside for this server: an affinity narrower than the machine (`taskset`, a cpuset,
    Kubernetes' static CPU manager) and not cut down further by a cgroup quota. A server that
    may share the machine with others keeps off any one core: several servers would all
    pick the same. "none" never does."""
    if policy == "none":
        return None, "--frontend-core none"
    if len(cpus) < 2:
        return None, "one core"
    if policy == "auto":
        if len(cpus) >= machine_cpus:
            return None, "no cores set aside for it; --frontend-core pin keeps it on one"
        if budget.usable < len(cpus):
            return None, f"{budget.describe()}: a quota, so no core is set aside for it"
    return cpus[-1], f"--frontend-core {policy}; none spreads it over them all"


def use_compute_cpus() -> None:
    """Lets the calling thread (an inline instance's, a worker process's first) run on
    every core the models may use, where the frontend was placed on one. Never raises: a
    thread that cannot move (its cpuset shrank since the start) serves from where it is."""
    compute = compute_cpus()
    if not compute:
        return
    try:
        os.sched_setaffinity(0, compute)
    except OSError as exc:
        log.warning(
            "a model thread stays on the frontend's core: cannot move it to cpus %s (%s); "
            "restart the server to place its threads on the cores it has now",
            _ranges(sorted(compute)),
            exc,
        )


def _ranges(cpus: list[int]) -> str:
    """E.g. [0, 1, 2, 5] -> '0-2,5'."""
    parts: list[str] = []
    start = prev = cpus[0]
    for cpu in [*cpus[1:], None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if cpu is not None:
            start = prev = cpu
    return ",".join(parts)


def _own_cgroups(self_cgroup: Path) -> dict[str, str]:
    """The process's cgroup paths from /proc/self/cgroup: '' for v2, 'cpu' for v1's cpu
    controller."""
    paths: dict[str, str] = {}
    try:
        text = self_cgroup.read_text()
    except OSError:
        return paths
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            paths[""] = path
        elif "cpu" in controllers.split(","):
            paths["cpu"] = path
    return paths


def _up_from(base: Path, own: str | None) -> Iterator[Path]:
    """`base/own` and each folder above it up to `base`: a cgroup's limit holds for every
    cgroup below it. Inside a container `own` is often not under `base` (base is the
    container's own cgroup already); the walk then ends at `base` alone."""
    relative = PurePosixPath((own or "").lstrip("/"))
    if ".." in relative.parts:
        relative = PurePosixPath()
    while True:
        yield base / relative
        if relative == PurePosixPath():
            return
        relative = relative.parent


def _fields(path: Path) -> list[str] | None:
    try:
        return path.read_text().split()
    except OSError:
        return None


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> float | None:
    """The tightest CPU quota of the process's cgroups, in cpus (quota / period), from cgroup
    v2's `cpu.max` or v1's `cpu.cfs_quota_us` / `cpu.cfs_period_us` under `root`; None when
    no file sets one (files absent or unreadable count as no limit)."""
    own = _own_cgroups(self_cgroup)
    limits: list[float] = []
    for folder in _up_from(root, own.get("")):
        fields = _fields(folder / "cpu.max")  # "max 100000" or "150000 100000"
        if fields and len(fields) == 2 and fields[0] != "max":
            limits.append(_ratio(fields[0], fields[1]))
    for mount in _V1_CPU_MOUNTS:
        for folder in _up_from(root / mount, own.get("cpu")):
            quota = _fields(folder / "cpu.cfs_quota_us")  # -1: no limit
            period = _fields(folder / "cpu.cfs_period_us")
            if quota and period:
                limits.append(_ratio(quota[0], period[0]))
    limits = [x for x in limits if x > 0]
    return min(limits) if limits else None


def _ratio(quota: str, period: str) -> float:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return -1.0
    return q / p if q > 0 and p > 0 else -1.0


def read_cpu_budget(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> CpuBudget:
    """This process's CPU budget: its affinity and its cgroup quota (`root`, `self_cgroup`:
    where to read the cgroup files; tests point them at fakes)."""
    return CpuBudget(affinity_count(), cgroup_cpu_quota(root, self_cgroup))


def cpu_instances(groups: list[InstanceGroup]) -> int:
    """A model's instances that run on the CPU (kind cpu, inline and auto), at least 1.

    `auto` counts as CPU: where the backend reads it, whether a GPU will be found is not
    known yet, and a GPU instance needs few CPU threads anyway."""
    return max(1, sum(g.count for g in groups if g.kind != "gpu"))


def threads_per_instance(usable: int, instances: int) -> int:
    """Threads per instance: `max(1, (usable - 1) // instances)` when `usable > 1`, else 1.
    One core is left to the frontend (gRPC, HTTP, batching), the rest shared out."""
    if usable <= 1:
        return 1
    return max(1, (usable - 1) // max(1, instances))


def shares_cores(usable: int, instances: int, threads: int) -> bool:
    """Whether `instances` x `threads` busy threads plus the frontend's need more cores than
    `usable`: then a spinning thread takes the core another needs, so spinning should be off."""
    return instances * threads + 1 > usable


# The parameter saying which thread settings Tiffin chose, and from what (backends add it
# to the completed config, so ModelConfig shows it).
THREAD_NOTE = "thread_defaults"

# model name -> the thread sentence last logged for it: the repository is read again on every
# poll and reload, and the choice is said once, and again only when it changes.
_announced: dict[str, str] = {}


def announce(name: str, sentence: str) -> None:
    """Logs a model's thread choice once, and again only when it changes."""
    if sentence and _announced.get(name) != sentence:
        _announced[name] = sentence
        log.info("%s", sentence)
