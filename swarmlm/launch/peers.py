"""A swarm of real `swarmlm peer` processes on this machine (for `make demo`, benchmarks and tests)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PeerProcess:
    """One `swarmlm peer` in its own process group, so its DHT and p2pd children go with it."""

    command = "peer"

    def __init__(
        self,
        *args: str,
        initial: str | None = None,
        log_dir: Path | None = None,
        threads: int | None = 1,
        prefix: tuple[str, ...] = (),
    ) -> None:
        """`threads`: each peer's compute threads; peers sharing one machine should not each take every core.
        `prefix`: a command to run the peer under, e.g. ("ip", "netns", "exec", NAME) for another host."""
        log_dir = log_dir or Path(tempfile.gettempdir())
        self.log = log_dir / f"swarmlm-{self.command}-{os.getpid()}-{time.monotonic_ns()}.log"
        cmd = [*prefix, sys.executable, "-m", "swarmlm.cli", self.command, *args]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        if initial:
            cmd += ["--initial-peers", initial]
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.maddr = ""
        self.peer_id = ""
        self.api = args[args.index("--api") + 1] if "--api" in args else None  # host:port of its gateway

    def _ready(self, text: str) -> re.Match[str] | None:
        """(peer id, multiaddr) once the log says the process is ready."""
        if "swarmlm peer ready" in text and (self.api is None or "swarmlm gateway:" in text):
            m = re.search(r"swarmlm peer (\S+): others join with --initial-peers (\S+)", text)
            if m is None:
                raise RuntimeError(f"peer printed no multiaddr:\n{text[-3000:]}")
            return m
        return None

    def wait_ready(self, timeout: float = 180) -> PeerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text()
            if m := self._ready(text):
                self.peer_id, self.maddr = m.group(1), m.group(2)
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"peer exited ({self.proc.returncode}):\n{text[-3000:]}")
            time.sleep(0.25)
        raise TimeoutError(f"peer not ready after {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

    def span(self) -> tuple[int, int]:
        m = re.search(r"swarmlm peer ready: \S+ layers (\d+):(\d+)", self.log.read_text())
        if m is None:
            raise RuntimeError("peer is not ready")
        return int(m.group(1)), int(m.group(2))

    def pids(self) -> set[int]:
        """The peer and every process below it (DHT process, p2pd daemon, ...)."""
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        found, todo = set(), [self.proc.pid]
        while todo:
            pid = todo.pop()
            if pid not in found:
                found.add(pid)
                todo.extend(children.get(pid, []))
        return found

    def crash(self) -> None:
        """kill -9 of the whole process group: the peer vanishes without a word."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def leave(self, timeout: float = 30) -> None:
        """SIGTERM, as Ctrl-C or a service manager would: the peer withdraws its record and shuts down."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.crash()

    def stop(self) -> None:
        """Leave, and kill anything of the peer's that is still running after that."""
        tree = self.pids()
        self.leave()
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


P = TypeVar("P", bound=PeerProcess)


def alive(pids: set[int]) -> set[int]:
    """Those of `pids` still running (zombies count as gone)."""
    running = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            running.add(pid)
    return running


def start_peers(n: int, make: Callable[[int, str | None], P]) -> list[P]:
    """`n` peers of one swarm: `make(0, None)` as the bootstrap, then, once it is ready, `make(rank, its
    multiaddr)` for all the others at once (each needs only the bootstrap, and their loading overlaps). Returns
    them ready; if one fails to start, the ones already started are stopped."""
    peers: list[P] = []
    try:
        for rank in range(n):
            peers.append(make(rank, peers[0].wait_ready().maddr if peers else None))
        for peer in peers:
            peer.wait_ready()
    except BaseException:
        for p in peers:
            p.stop()
        raise
    return peers


def start_swarm(
    spans: list[str], extra: tuple[str, ...] = (), log_dir: Path | None = None, threads: int | None = 1
) -> list[PeerProcess]:
    """One peer per `--layers` value, started by `start_peers`."""
    return start_peers(
        len(spans),
        lambda rank, boot: PeerProcess("--layers", spans[rank], *extra, initial=boot, log_dir=log_dir, threads=threads),
    )
