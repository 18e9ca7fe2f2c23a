"""A `swarmlm serve` process on this machine (for tests and benchmarks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from swarmlm.launch.peers import free_port


class ServerProcess:
    """A real `swarmlm serve` process on loopback, in its own process group."""

    def __init__(self, *args: str, prefix: tuple[str, ...] = ()) -> None:
        """`prefix`: a command to run the server under, e.g. ("taskset", "-c", "0") to pin it to one core."""
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = Path(f"/tmp/swarmlm-test-server-{self.port}.log")
        cmd = [*prefix, sys.executable, "-m", "swarmlm.cli", "serve", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 240) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"server not ready:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
