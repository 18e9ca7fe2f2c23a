"""A peer's copy of the ledger: an append-only JSON-lines file, one entry per line, fsynced per append.

A crash can leave at most a torn last line (no trailing newline, or not JSON): opening the copy for
writing finds it, drops it and says so. Anything else that does not verify is tampering, and the copy
refuses to grow until it is fixed (`swarmlm ledger verify` names the first bad entry).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from swarmlm.core.identity import Identity
from swarmlm.ledger.chain import ChainState, Entry, LedgerError, Verdict, verify_chain

log = logging.getLogger(__name__)


def ledger_path(peer_id: str) -> Path:
    """Where a peer keeps its copy unless told: $SWARMLM_HOME (default ~/.swarmlm)/ledger/<peer id>.jsonl."""
    return Path(os.environ.get("SWARMLM_HOME", "~/.swarmlm")).expanduser() / "ledger" / f"{peer_id}.jsonl"


def read_lines(path: Path) -> tuple[list[Entry | LedgerError], bool]:
    """Every complete line as an entry (or the error that stops it being one), and whether the last
    line was torn (written without its newline: a crash mid-append)."""
    data = path.read_bytes() if path.exists() else b""
    lines = data.split(b"\n")
    torn = lines.pop() != b""  # the text after the last newline: empty unless an append was cut short
    items: list[Entry | LedgerError] = []
    for line in lines:
        try:
            items.append(Entry.from_wire(json.loads(line)))
        except (ValueError, UnicodeDecodeError) as e:  # json's errors and LedgerError are ValueErrors
            items.append(e if isinstance(e, LedgerError) else LedgerError(f"not JSON: {e}"))
    return items, torn


def verify_file(path: Path) -> Verdict:
    items, _ = read_lines(path)
    return verify_chain(items)


class Ledger:
    """One peer's copy. Thread-safe; one writing process per file (an exclusive lock enforces it)."""

    def __init__(self, path: str | Path | None, identity: Identity | None = None) -> None:
        """`path` None: a copy held in memory only (a client's view of the swarm's ledger)."""
        self.path = Path(path) if path is not None else None
        self.identity = identity
        self._lock = threading.Lock()
        self._file: BinaryIO | None = None
        self.entries: list[Entry] = []
        self._state = ChainState()
        if self.path is not None:
            self._open(self.path)

    def _open(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "ab+")  # noqa: SIM115 - held open for the copy's lifetime
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise LedgerError(f"{path} is open for writing by another process") from None
        items, torn = read_lines(path)
        if torn:
            good = path.read_bytes().rfind(b"\n") + 1
            cut = path.stat().st_size - good
            log.warning("ledger %s: dropped a torn last entry (%d bytes) left by a crash", path, cut)
            self._file.truncate(good)
            os.fsync(self._file.fileno())
        verdict = verify_chain(items)
        if not verdict.ok:
            self._file.close()
            raise LedgerError(
                f"{path}: entry {verdict.first_bad} is bad ({verdict.reason}); run `swarmlm ledger verify`"
            )
        self.entries = [e for e in items if isinstance(e, Entry)]
        for entry in self.entries:
            self._state.add(entry)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, entry: Entry) -> None:
        if self._file is not None:
            self._file.write(json.dumps(entry.to_wire(), ensure_ascii=False).encode() + b"\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        self._state.add(entry)
        self.entries.append(entry)

    def append(self, kind: str, body: dict[str, Any]) -> Entry:
        """Write a new entry signed by this peer."""
        if self.identity is None:
            raise LedgerError("this copy has no identity to sign with")
        with self._lock:
            seq = self._state.next_seq.get(self.identity.peer_id, 0)
            entry = Entry.create(self.identity, seq, self._state.tip, time.time(), kind, body)
            self._write(entry)
            return entry

    def merge(self, entries: Iterable[Entry]) -> int:
        """Add entries from another copy, in their order; already-held ones are skipped. Stops with
        LedgerError at the first that does not verify (what came before it is kept). Returns how many
        were added."""
        added = 0
        with self._lock:
            for entry in entries:
                if entry.hash in self._state.hashes:
                    continue
                self._state.check(entry)
                self._write(entry)
                added += 1
        return added

    def heads(self) -> dict[str, int]:
        """author -> how many of its entries this copy holds: what a peer asks another for more than."""
        with self._lock:
            return dict(self._state.next_seq)

    def since(self, heads: dict[str, int]) -> list[Entry]:
        """The entries a copy with these `heads` lacks, in this copy's order (which respects every link)."""
        with self._lock:
            return [e for e in self.entries if e.seq >= heads.get(e.author, 0)]
