"""Per-GPU utilisation and memory from NVML (`nvidia-ml-py`, the `gpu` extra), when scraped.

NVML is imported and started at the first scrape, not at import: a CPU machine, or one
without the package or the driver, reports no GPU metrics and says so once in the log.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuSample:
    """One device as NVML sees it now."""

    index: int  # NVML's index: every device of the machine, whatever CUDA_VISIBLE_DEVICES says
    uuid: str
    utilization_ratio: float  # share of the last sample period a kernel ran, 0 to 1
    memory_used_bytes: int
    memory_total_bytes: int


class Gpus:
    """Reads every device NVML knows; `sample()` is empty where there is no NVML."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nvml: Any = None
        self._tried = False

    def _start(self) -> Any:
        """The pynvml module, started; None where it cannot be (tried once)."""
        with self._lock:
            if not self._tried:
                self._tried = True
                try:
                    import pynvml

                    pynvml.nvmlInit()
                    self._nvml = pynvml
                except Exception as exc:  # no package, no driver, no device: all the same here
                    log.info("no GPU metrics: NVML is not available (%s)", exc)
            return self._nvml

    def sample(self) -> list[GpuSample]:
        nvml = self._start()
        if nvml is None:
            return []
        samples = []
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = nvml.nvmlDeviceGetUUID(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                samples.append(
                    GpuSample(
                        index=index,
                        uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                        utilization_ratio=nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100,
                        memory_used_bytes=int(memory.used),
                        memory_total_bytes=int(memory.total),
                    )
                )
        except nvml.NVMLError as exc:  # a device lost (Xid, reset): the ones read so far
            log.warning("reading GPU metrics from NVML failed: %s", exc)
        return samples
