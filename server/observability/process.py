"""What a process costs, read from /proc when scraped: CPU seconds, memory, open files.

The same figures as prometheus_client's process collector, for the server itself and for
each worker process, read with a few small file reads and no dependency. Elsewhere than
Linux there is no /proc, and nothing is reported.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")


@dataclass(frozen=True)
class ProcessSample:
    """One process as it is now."""

    cpu_seconds: float  # user and system
    resident_bytes: int
    virtual_bytes: int
    open_fds: int
    max_fds: int  # the soft limit; 0 when unlimited or unknown
    start_time_seconds: float  # since the Unix epoch


@functools.cache
def _clock() -> tuple[int, int, float]:
    """Clock ticks a second, bytes a page, and when the machine booted (epoch seconds)."""
    boot = 0.0
    for line in (_PROC / "stat").read_text().splitlines():
        if line.startswith("btime "):
            boot = float(line.split()[1])
            break
    return os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE"), boot


def sample(pid: int) -> ProcessSample | None:
    """The process `pid` now; None when it is gone or /proc cannot tell."""
    try:
        ticks, page, boot = _clock()
        stat = (_PROC / str(pid) / "stat").read_text()
        # The command name (field 2) may hold spaces and parentheses: split after its end.
        fields = stat[stat.rindex(")") + 2 :].split()
        open_fds = len(os.listdir(_PROC / str(pid) / "fd"))
        max_fds = 0
        for line in (_PROC / str(pid) / "limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft = line.split()[3]
                max_fds = int(soft) if soft.isdigit() else 0
                break
    except (OSError, ValueError, IndexError):
        return None
    # Fields counted from 3 (state) in proc(5): utime 14, stime 15, starttime 22,
    # vsize 23, rss 24 (pages).
    return ProcessSample(
        cpu_seconds=(int(fields[11]) + int(fields[12])) / ticks,
        resident_bytes=int(fields[21]) * page,
        virtual_bytes=int(fields[20]),
        open_fds=open_fds,
        max_fds=max_fds,
        start_time_seconds=boot + int(fields[19]) / ticks,
    )
