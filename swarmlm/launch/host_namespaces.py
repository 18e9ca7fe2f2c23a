"""What the emulated networks (`wan.py`, `nat_lan.py`) share: hosts that are network namespaces named
`swl-<network>-<host>`, each with one IPv4 address, and the command prefix that runs a process there."""

from __future__ import annotations

import subprocess


def run_ip(*args: str, stdin: str | None = None) -> None:
    """Run an iproute2 command; OSError with its message if it fails."""
    done = subprocess.run(["ip", *args], input=stdin, capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class HostNamespaces:
    """Hosts `NAME` as namespaces `swl-<network>-NAME` at `ips[NAME]`."""

    network = ""  # set by each emulated network

    def __init__(self, ips: dict[str, str]) -> None:
        self.ips = ips

    def namespace(self, name: str) -> str:
        return f"swl-{self.network}-{name}"

    def ip(self, name: str) -> str:
        return self.ips[name]

    def prefix(self, name: str) -> tuple[str, ...]:
        """A command prefix that runs a program on host `name` (PeerProcess's `prefix`)."""
        return ("ip", "netns", "exec", self.namespace(name))
