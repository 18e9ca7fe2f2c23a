"""Was anything else running? The share of the machine's CPU used by processes other than a benchmark and
the processes under test, from /proc (bench/serve_bench.py, bench/big_bench.py).

Two cores leave no headroom: another job (a test suite, a build) silently halves a backend's numbers, and
llama.cpp's spinning worker threads suffer most. Measuring it lets a reader discard tainted runs."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def busy_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies over all CPUs since boot, from /proc/stat.

    Fields: user nice system idle iowait irq softirq steal (guest time is already inside user). Steal,
    time the hypervisor gave to other VMs, is not "busy" here: no process on this machine caused it."""
    user, nice, system, idle, iowait, irq, softirq, steal = (
        int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    busy = user + nice + system + irq + softirq
    return busy, busy + idle + iowait + steal


def _group_jiffies(pgids: set[int]) -> int:
    """utime + stime of every live process in these process groups (servers and anything they spawned)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            rest = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)", which may contain spaces
            if int(rest[2]) in pgids:
                total += int(rest[11]) + int(rest[12])
    return total


def _self_jiffies() -> int:
    t = os.times()
    return round((t.user + t.system) * os.sysconf("SC_CLK_TCK"))


class ForeignCpu:
    """Share of the machine's CPU used, since this was made, by processes outside this benchmark and the
    process groups given (each process under test leads its own)."""

    def __init__(self, *pgids: int) -> None:
        self.pgids = set(pgids)
        self.start = self.now()

    def share(self) -> float | None:
        busy, total, tested, me = (b - a for a, b in zip(self.start, self.now(), strict=True))
        return max(0.0, (busy - tested - me) / total) if total > 0 else None

    def now(self) -> tuple[int, int, int, int]:
        return (*busy_jiffies(), _group_jiffies(self.pgids), _self_jiffies())
