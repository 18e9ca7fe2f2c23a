"""One process's CPU time and memory, from /proc (the benchmarks' per-process figures)."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory(pid: int) -> dict[str, int]:
    """A process's resident memory now and at its peak (VmRSS and VmHWM of /proc/PID/status), in bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {"rss_bytes": int(fields["VmRSS"].split()[0]) << 10, "peak_rss_bytes": int(fields["VmHWM"].split()[0]) << 10}
