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
from typing import Any, TypeVar


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
            m = self._address(text)
            if m is None:
                raise RuntimeError(f"peer printed no multiaddr:\n{text[-3000:]}")
            return m
        return None

    def _address(self, text: str) -> re.Match[str] | None:
        """(peer id, multiaddr) once the peer's DHT node is up: others can join it while it still loads."""
        return re.search(rf"swarmlm {self.command} (\S+): others join with --initial-peers (\S+)", text)

    def wait_ready(self, timeout: float = 180) -> PeerProcess:
        return self._wait_for(self._ready, "ready", timeout)

    def wait_address(self, timeout: float = 180) -> PeerProcess:
        return self._wait_for(self._address, "reachable", timeout)

    def _wait_for(self, found: Callable[[str], re.Match[str] | None], what: str, timeout: float) -> PeerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text()
            if m := found(text):
                self.peer_id, self.maddr = m.group(1), m.group(2)
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"peer exited ({self.proc.returncode}):\n{text[-3000:]}")
            time.sleep(0.25)
        raise TimeoutError(f"peer not {what} after {timeout:.0f} s:\n{self.log.read_text()[-3000:]}")

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
        stop_all([self])


class DhtProcess(PeerProcess):
    """One `swarmlm dht`: a DHT node alone, ready once it printed its multiaddr."""

    command = "dht"

    def __init__(self, *args: str, **kwargs: Any) -> None:
        super().__init__(*args, threads=None, **kwargs)  # it computes nothing

    def _ready(self, text: str) -> re.Match[str] | None:
        return self._address(text) if "swarmlm dht ready" in text else None


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


def stop_all(procs: list[P], timeout: float = 30) -> None:
    """Stop peers together: SIGTERM to each (each withdraws its record and shuts down, in parallel), wait
    for them, then kill anything of theirs still running (a peer's DHT or p2pd child, one that hung)."""
    trees = [p.pids() for p in procs]
    for p in procs:
        if p.proc.poll() is None:
            p.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.crash()
    for pid in set().union(*trees):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def start_peers(n: int, make: Callable[[int, str | None], P]) -> list[P]:
    """`n` peers of one swarm: `make(0, None)` as the bootstrap, then, once its DHT node is up, `make(rank,
    its multiaddr)` for all the others at once (each needs only the bootstrap, and their loading overlaps).
    Returns them ready; if one fails to start, the ones already started are stopped."""
    peers: list[P] = []
    try:
        for rank in range(n):
            peers.append(make(rank, peers[0].wait_address().maddr if peers else None))
        for peer in peers:
            peer.wait_ready()
    except BaseException:
        stop_all(peers)
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
