"""Which devices instances may use, decided in the frontend before any framework loads."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Literal, NamedTuple

from tiffin.backends import Device
from tiffin.protos.model_config import InstanceGroup

log = logging.getLogger(__name__)


def visible_gpus() -> list[int]:
    """GPU ids this process may use: the NVIDIA driver's list, narrowed by CUDA_VISIBLE_DEVICES.

    Read from /proc so that no CUDA library is imported in the frontend.
    """
    driver = Path("/proc/driver/nvidia/gpus")
    present = len(list(driver.iterdir())) if driver.is_dir() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(range(present))
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    return [i for i in range(len(ids)) if i < present]


_told_no_gpu = threading.Event()


def _tell_no_gpu() -> None:
    """Says once per process that `auto` instances run on the CPU (not once per model)."""
    if not _told_no_gpu.is_set():
        _told_no_gpu.set()
        log.info(
            "no GPU available: instances of kind auto run on the CPU (inline or in worker "
            "processes, as timing each model at load decides)"
        )


class Placement(NamedTuple):
    """Where one instance runs: its device, and how it runs there.

    `worker`: a process of its own; `inline`: inside the server process; `measured`: a
    `kind: auto` instance on a machine without its GPU, a worker or inline as timing it at
    load decides (scheduler/instance_choice.py)."""

    device: Device
    runs: Literal["worker", "inline", "measured"]


def place_instances(groups: list[InstanceGroup], model: str) -> list[Placement]:
    """Each instance's placement. Raises ValueError when a GPU asked for is not here."""
    gpus = visible_gpus()
    devices: list[Placement] = []
    for group in groups:
        label = f"instance_group '{group.name}'" if group.name else "instance_group"
        if group.kind in ("cpu", "inline"):
            runs: Literal["worker", "inline"] = "inline" if group.kind == "inline" else "worker"
            devices += [Placement(Device("cpu"), runs)] * group.count
            continue
        wanted = group.gpus or gpus
        missing = [g for g in group.gpus if g not in gpus]
        if group.kind == "gpu" and (missing or not wanted):
            have = ", ".join(map(str, gpus)) or "none"
            asked = ", ".join(map(str, missing)) if missing else "any"
            raise ValueError(
                f"{label} of model '{model}' asks for GPU {asked}, but this machine's visible "
                f"GPUs are: {have}"
            )
        if group.kind == "auto" and (missing or not wanted):
            if missing:  # this model named GPUs that are not here
                log.warning(
                    "model '%s': %s asks for GPU %s, which is not visible; using the CPU",
                    model,
                    label,
                    ", ".join(map(str, missing)),
                )
            else:
                _tell_no_gpu()
            devices += [Placement(Device("cpu"), "measured")] * group.count
            continue
        for gpu in wanted:
            devices += [Placement(Device("gpu", gpu), "worker")] * group.count
    return devices
