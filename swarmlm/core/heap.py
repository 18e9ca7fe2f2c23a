"""What the C library's allocator keeps of freed memory (glibc's; elsewhere these are no-ops).

glibc returns a large freed block to the OS only while it is above its mmap threshold, and raises that
threshold (up to 32 MiB) each time such a block is freed; with one arena per thread (up to 8 per core) a
process holds on to much of what its threads freed. For a server that is a one-off (`release_freed_memory`
after a load); for a training peer, whose every step frees and reallocates gradients and activations
across several threads, it is a standing cost: `make bench-pipeline --size base` measured stage peers
peaking at 1.79-2.37 GB against 0.76-0.85 GB of counted state, 1.69-2.03 GB with
`hold_little_freed_memory` (bench/RESULTS.md: pipeline training). A 1 MiB threshold rather than 128 KiB:
the same peaks, and the one-process run kept its speed (66 tokens/s against 57: a smaller threshold maps
and faults in every layer's gradients and activations afresh each step).
"""

from __future__ import annotations

import contextlib
import ctypes

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameters (malloc.h)
_M_ARENA_MAX = -8


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None)


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS. glibc keeps the memory a load freed (the checkpoint's
    unfused projections, other layers read for `checkpoint_digests`): without this a peer's RSS would
    carry it for its whole life."""
    with contextlib.suppress(OSError, AttributeError):
        _libc().malloc_trim(0)


def hold_little_freed_memory(mmap_threshold: int = 1 << 20, arenas: int = 2) -> None:
    """From now on in this process: every block of `mmap_threshold` bytes or more is mapped apart and
    unmapped when freed (a fixed threshold: glibc stops raising it), and threads share `arenas` arenas.
    Call it early, before the threads that allocate start."""
    with contextlib.suppress(OSError, AttributeError):
        libc = _libc()
        libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        libc.mallopt(_M_ARENA_MAX, arenas)
