"""A crash leaves nothing behind: every child a swarmlm process forks dies with it, even on SIGKILL.

Why this reaches into how hivemind and uvloop spawn processes: hivemind starts helper processes that
outlive a parent killed with SIGKILL (what the OOM killer sends, to one PID, not to its group):

- `hivemind.DHT(start=True)` is a `multiprocessing` fork (`mp.context.ForkProcess`), and so is a
  `DecentralizedAverager` (`mp.Process`, fork by default on Linux). Neither watches its parent: marked
  daemonic, they are only terminated by the parent's `atexit` hook, which SIGKILL never runs.
- `p2pd`, hivemind's libp2p daemon (a Go binary), is spawned by the DHT process, in `DHTNode.create` ->
  `P2P.create`, with `asyncio.subprocess.create_subprocess_exec` on the uvloop loop that the DHT process
  runs (`switch_to_uvloop`). Only `P2P._terminate` stops it. (It tends to die of SIGPIPE once the DHT
  process is gone, writing to its stdout pipe; nothing here relies on that.)

The fix is the kernel's parent-death signal, `prctl(PR_SET_PDEATHSIG, SIGKILL)`, set in each child right
after the fork. It needs no patch of hivemind: `os.register_at_fork` hooks run in every child that Python
forks (`os.fork`, so `multiprocessing`'s fork start method), and uvloop's `subprocess_exec` calls
`PyOS_AfterFork_Child` in its child before the exec, which runs the same hooks; the signal survives the
exec, so `p2pd` dies with the DHT process that spawned it. (asyncio's own loop, like `subprocess.Popen`
without `preexec_fn`, spawns through vfork/posix_spawn and runs no hook; hivemind spawns nothing that way.)

Two caveats the hook handles:

- The kernel sends the signal when the *thread* that forked exits, not the process. A fork from the main
  thread is safe (that thread lives as long as the process). A fork from another thread (a `RemoteModel`
  made in a worker thread, the gateway's thread of a peer) gets no parent-death signal, which would kill
  a live DHT when that thread ends; a daemon thread of the child polls its parent id instead.
- The parent may die between the fork and the `prctl`: then the child has been reparented already and
  no signal will come, so it checks its parent id after setting the signal and exits at once.

`torch_shm_manager` needs nothing: torch's libshm starts it (a plain fork and exec, no Python hook) once
a tensor is shared under the `file_system` strategy, which importing hivemind selects; it quits by itself
2 s after the last process connected to it is gone. It outlived a crash only because the orphaned DHT
process was still connected to it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCH_INTERVAL = 0.5  # seconds between a watcher thread's looks at its parent id

_installed = False
_prctl: Callable[..., int] | None = None  # libc's prctl, resolved before any fork (no lookup in a child)
# The parent's pid and whether the forking thread is its main thread, recorded just before each fork,
# keyed by the forking thread's id (fork keeps the calling thread's id in the child).
_forks: dict[int, tuple[int, bool]] = {}


def install() -> None:
    """Make every child forked from now on die with this process. Idempotent; a no-op off Linux. Call it
    before anything forks: in the process that starts hivemind, before its DHT or averager."""
    global _installed, _prctl
    if _installed or not sys.platform.startswith("linux"):
        return
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
    _prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    _prctl.restype = ctypes.c_int
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)
    _installed = True


def _before_fork() -> None:
    _forks[threading.get_ident()] = (os.getpid(), threading.current_thread() is threading.main_thread())


def _after_fork_in_parent() -> None:
    _forks.pop(threading.get_ident(), None)


def _after_fork_in_child() -> None:
    forked = _forks.pop(threading.get_ident(), None)
    _forks.clear()  # other threads' pending forks are theirs, not this child's
    if forked is None:  # a fork whose `before` hook did not run (cannot happen with Python's own forks)
        return
    parent, from_main_thread = forked
    if from_main_thread:
        assert _prctl is not None
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # Checked after the prctl: a parent that died before it sent no signal and never will (we were
    # reparented, so our parent id is no longer its pid).
    if os.getppid() != parent:
        os._exit(1)
    if not from_main_thread:
        threading.Thread(target=_watch_parent, args=(parent,), name="swarmlm-parent-watch", daemon=True).start()


def _watch_parent(parent: int) -> None:
    """Kill this process once `parent` is gone (the child is reparented, so its parent id changes)."""
    while os.getppid() == parent:
        time.sleep(WATCH_INTERVAL)
    os.kill(os.getpid(), signal.SIGKILL)  # as the parent-death signal would: no cleanup that could hang
