"""Ledger entries and the rules that make a sequence of them a valid, tamper-evident chain.

An entry is signed by its author over (author, seq, prev, time, kind, body); its hash covers that and the
signature. Two links make tampering visible:

- `prev` is the hash of the newest entry the author held when it wrote: every entry points back into
  the ledger, so a copy is a hash-linked DAG that grows at its tips (writers append concurrently and
  copies merge, so a single line would need consensus; causal links do not).
- `seq` counts each author's own entries 0, 1, 2, ...: no entry of an author can be dropped, replayed or
  moved past another of the same author without a gap or an inversion.

`verify` checks both, every hash and every signature, in file order, and names the first bad entry.
Dropping the newest entries of a copy is indistinguishable from not having received them yet; syncing
with any peer that has them brings them back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from swarmlm.core.encoding import canonical
from swarmlm.core.identity import Identity
from swarmlm.core.identity import verify as verify_signature

KINDS = ("model_version", "training_round", "join", "leave", "attestation", "accusation")
GENESIS = ""  # the `prev` of an author's first entry in an empty ledger


class LedgerError(ValueError):
    """An entry or a copy that breaks the chain's rules; the message names the entry and the rule."""


@dataclass(frozen=True)
class Entry:
    author: str
    seq: int
    prev: str
    time: float
    kind: str
    body: dict[str, Any]
    sig: str  # hex Ed25519 signature by `author`
    hash: str = field(default="", compare=False)  # filled from the other fields

    def __post_init__(self) -> None:
        object.__setattr__(self, "hash", hashlib.sha256(self.signed_bytes() + bytes.fromhex(self.sig)).hexdigest())

    def signed_bytes(self) -> bytes:
        fields = {"author": self.author, "seq": self.seq, "prev": self.prev, "time": self.time}
        return canonical({**fields, "kind": self.kind, "body": self.body})

    @classmethod
    def create(cls, identity: Identity, seq: int, prev: str, time: float, kind: str, body: dict[str, Any]) -> Entry:
        if kind not in KINDS:
            raise LedgerError(f"unknown entry kind {kind!r}; kinds: {', '.join(KINDS)}")
        unsigned = cls(identity.peer_id, seq, prev, time, kind, body, sig="")
        return cls(identity.peer_id, seq, prev, time, kind, body, identity.sign(unsigned.signed_bytes()).hex())

    def to_wire(self) -> dict[str, Any]:
        return {
            "author": self.author,
            "seq": self.seq,
            "prev": self.prev,
            "time": self.time,
            "kind": self.kind,
            "body": self.body,
            "sig": self.sig,
            "hash": self.hash,
        }

    @classmethod
    def from_wire(cls, value: Any) -> Entry:
        """An entry from a line or a peer; LedgerError if its shape is wrong or its stated hash is not its own."""
        types = {"author": str, "seq": int, "prev": str, "time": (int, float), "kind": str, "body": dict, "sig": str}
        if not isinstance(value, dict) or set(value) != {*types, "hash"}:
            raise LedgerError("not a ledger entry (wrong fields)")
        for name, kind in types.items():
            if not isinstance(value[name], kind) or isinstance(value[name], bool):
                raise LedgerError(f"field {name!r} has the wrong type")
        try:
            entry = cls(**{k: value[k] for k in types})
        except ValueError:
            raise LedgerError("signature is not hex") from None
        if entry.hash != value["hash"]:
            raise LedgerError("stated hash does not match the entry's content")
        return entry


@dataclass
class ChainState:
    """What the checks of the next entry need to know about the entries before it."""

    hashes: set[str] = field(default_factory=set)
    next_seq: dict[str, int] = field(default_factory=dict)  # author -> seq its next entry must have
    tip: str = GENESIS  # hash of the newest entry

    def check(self, entry: Entry) -> None:
        """LedgerError if `entry` cannot come next."""
        if entry.kind not in KINDS:
            raise LedgerError(f"unknown kind {entry.kind!r}")
        if not verify_signature(entry.author, entry.signed_bytes(), bytes.fromhex(entry.sig)):
            raise LedgerError(f"bad signature: not signed by its author {entry.author}")
        if entry.hash in self.hashes:
            raise LedgerError("duplicate of an earlier entry")
        expected = self.next_seq.get(entry.author, 0)
        if entry.seq != expected:
            raise LedgerError(f"author {entry.author[:16]}… entry #{entry.seq} where #{expected} was due")
        if entry.prev != GENESIS and entry.prev not in self.hashes:
            raise LedgerError(f"links to {entry.prev[:16]}…, which no earlier entry is")
        if entry.prev == GENESIS and entry.seq > 0:  # its author held its own earlier entries
            raise LedgerError("links to the genesis after its author has written")

    def add(self, entry: Entry) -> None:
        self.hashes.add(entry.hash)
        self.next_seq[entry.author] = entry.seq + 1
        self.tip = entry.hash


@dataclass(frozen=True)
class Verdict:
    entries: int  # entries checked (all of them when ok)
    first_bad: int | None = None  # 1-based position of the first bad entry
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.first_bad is None


def verify_chain(items: Iterable[Entry | LedgerError]) -> Verdict:
    """Check entries in order; `items` may hold a LedgerError where a line could not even be parsed."""
    state = ChainState()
    for position, item in enumerate(items, start=1):
        try:
            if isinstance(item, LedgerError):
                raise item
            state.check(item)
        except LedgerError as e:
            return Verdict(position - 1, position, str(e))
        state.add(item)
    return Verdict(len(state.hashes))


def compare_copies(ours: Iterable[Entry], theirs: Iterable[Entry]) -> tuple[list[Entry], list[tuple[Entry, Entry]]]:
    """What one verified copy says about another: (their entries ours lacks, pairs of entries one author
    signed with the same number but different contents). A valid copy missing its newest entries is only
    visible this way; two entries at one number mean the author forked its chain (or a copy was rebuilt)."""
    by_slot = {(e.author, e.seq): e for e in ours}
    missing, forks = [], []
    for entry in theirs:
        mine = by_slot.get((entry.author, entry.seq))
        if mine is None:
            missing.append(entry)
        elif mine.hash != entry.hash:
            forks.append((mine, entry))
    return missing, forks
