"""A crash leaves nothing behind: `kill -9` of a peer's, gateway's or trainer's one PID (what the OOM killer
does: one process, not its group) takes every process below it along, within seconds: hivemind's DHT
process, its p2pd daemon, the averager, and torch_shm_manager (which quits once its clients are gone)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from swarmlm.launch.peers import PeerProcess, alive, free_port
from swarmlm.launch.trainers import TrainerProcess
from swarmlm.train.data import default_corpus_files, prepare

GONE_WITHIN = 10.0  # s; the parent-death signal is instant, a watcher thread looks every 0.5 s, and
# torch_shm_manager quits 2 s after its last client

# A process that installs the guard, then starts children the ways hivemind does; it prints their pids.
FORKS = textwrap.dedent(
    """
    import asyncio, os, threading, time
    import uvloop
    from swarmlm.core import process_guard

    process_guard.install()

    def fork() -> int:  # what multiprocessing's fork start method does: hivemind's DHT and averager
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        return pid

    async def spawn() -> int:  # how the DHT process starts p2pd: asyncio's subprocess on uvloop
        return (await asyncio.create_subprocess_exec("sleep", "60")).pid

    from_thread: list[int] = []
    worker = threading.Thread(target=lambda: from_thread.append(fork()))
    worker.start()
    worker.join()  # the thread that forked is gone: its child must live on
    time.sleep(1)
    print(fork(), from_thread[0], uvloop.run(spawn()), flush=True)
    time.sleep(60)
    """
)


def kill_9_leaves_nothing(proc: PeerProcess, forks: int, daemons: int) -> None:
    """Once `proc` is ready, at least `forks` forked children (hivemind's DHT and averager processes) and
    `daemons` p2pd run below it, so that the test cannot pass vacuously. SIGKILL of its PID alone must take
    every process below it along."""
    tree: dict[int, str] = {}
    try:
        proc.wait_ready()
        main = psutil.Process(proc.proc.pid)
        tree = {c.pid: c.name() for c in main.children(recursive=True)}
        names = list(tree.values())
        assert names.count(main.name()) >= forks and names.count("p2pd") >= daemons, tree
        os.kill(proc.proc.pid, signal.SIGKILL)  # the PID only, not its process group
        proc.proc.wait()
        deadline = time.monotonic() + GONE_WITHIN
        while (left := alive(set(tree))) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"left running after kill -9 of the {proc.command}: {[tree[p] for p in sorted(left)]}"
    finally:
        proc.stop()
        for pid in alive(set(tree)):  # what survived a failed check: the rest of the suite must not inherit it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_children_live_as_long_as_their_parent_and_die_with_it() -> None:
    """The mechanism: a child forked by the main thread, one forked by a thread that has ended since, and a
    program spawned on uvloop (the parent-death signal survives its exec) all outlive the thread that made
    them and die with the process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    parent = subprocess.Popen(
        [sys.executable, "-c", FORKS], stdout=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    children: set[int] = set()
    try:
        assert parent.stdout is not None
        children = {int(pid) for pid in parent.stdout.readline().split()}
        assert len(children) == 3 and alive(children) == children
        parent.kill()  # SIGKILL of its PID only
        parent.wait()
        deadline = time.monotonic() + GONE_WITHIN
        while alive(children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(children)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)


@pytest.mark.slow
def test_kill_9_of_a_peer_with_its_gateway() -> None:
    """A serving peer with `--api`: its own DHT process is forked from the main thread, the gateway's client
    DHT process from the gateway's thread (which the parent-death signal alone cannot cover); a p2pd each."""
    peer = PeerProcess("--layers", "0:1", "--api", f"127.0.0.1:{free_port()}")
    kill_9_leaves_nothing(peer, forks=2, daemons=2)


@pytest.mark.slow
def test_kill_9_of_a_gateway() -> None:
    """A gateway serving no layers (`--layers none --api`): its DHT and its client DHT, a p2pd each."""
    gateway = PeerProcess("--layers", "none", "--api", f"127.0.0.1:{free_port()}")
    kill_9_leaves_nothing(gateway, forks=2, daemons=2)


@pytest.mark.slow
def test_kill_9_of_a_trainer(tmp_path: Path) -> None:
    """A training peer: its DHT process with its p2pd, and the averager's process."""
    prepare(default_corpus_files()[:1], tmp_path / "data", train_tokenizer=300, block_size=32)  # a tiny run
    args = ("--data", str(tmp_path / "data"), "--rounds", "1000", "--inner-steps", "1000", "--batch-size", "2")
    trainer = TrainerProcess(*args, run_dir=tmp_path / "run")
    kill_9_leaves_nothing(trainer, forks=2, daemons=1)
