"""One process's CPU time and memory, from /proc (the benchmarks' per-process figures)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory(pid: int) -> dict[str, int]:
    """A process's resident memory now and at its peak (VmRSS and VmHWM of /proc/PID/status), in bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {"rss_bytes": int(fields["VmRSS"].split()[0]) << 10, "peak_rss_bytes": int(fields["VmHWM"].split()[0]) << 10}


def descendants(pid: int) -> list[int]:
    """A process and every process under it (children through /proc/PID/task/*/children)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return found


def tree_pss(pid: int) -> dict[str, int]:
    """Bytes a process and its descendants hold, each page counted once however many of them map it (their
    proportional set sizes), by process (its name and pid): a peer's main process, its forked DHT and
    averager, its p2pd. Their sum is the peer's memory."""
    found = {}
    for p in descendants(pid):
        try:
            rollup = Path(f"/proc/{p}/smaps_rollup").read_text()
            name = Path(f"/proc/{p}/comm").read_text().strip()
        except OSError:
            continue
        pss = (int(line.split()[1]) << 10 for line in rollup.splitlines() if line.startswith("Pss:"))
        found[f"{name}:{p}"] = sum(pss)
    return found


MEMORY_CGROUPS = Path("/sys/fs/cgroup/memory")  # cgroup v1's memory controller, as on these machines


def memory_cap_prefix(limit_bytes: int) -> tuple[str, ...]:
    """A command prefix that runs a process in a memory cgroup of its own capped at `limit_bytes` (named
    after its pid; children it starts later are capped with it): a peer with that much memory. Root only."""
    script = (
        f'cg={MEMORY_CGROUPS}/swarmlm-cap-$$ && mkdir "$cg" && echo {limit_bytes} > "$cg/memory.limit_in_bytes" '
        '&& echo $$ > "$cg/cgroup.procs" && exec "$@"'
    )
    return ("sh", "-c", script, "sh")


def capped_cgroup_exists() -> bool:
    """Whether this machine lets us make memory cgroups (root, cgroup v1 memory controller mounted rw)."""
    probe = MEMORY_CGROUPS / f"swarmlm-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
        return True
    except OSError:
        return False


def release_cap(pid: int) -> None:
    """Remove a finished process's cgroup (made by `memory_cap_prefix`), ending what it left in it (a
    torch_shm_manager outlives its peer by a minute)."""
    group = MEMORY_CGROUPS / f"swarmlm-cap-{pid}"
    with contextlib.suppress(OSError):
        for left in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(left), signal.SIGKILL)
        for _ in range(20):  # a killed task leaves its cgroup a moment later
            with contextlib.suppress(OSError):
                group.rmdir()
                return
            time.sleep(0.1)
