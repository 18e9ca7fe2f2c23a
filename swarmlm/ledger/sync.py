"""Copies of the ledger converge over P2P: a peer asks another for the entries it lacks.

The request carries our heads (how many entries of each author we hold); the answer is the other copy's
entries past them, in its order, which respects every link. Each is verified before it is appended, so
a lying peer can add nothing but its own signed entries.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

import msgpack
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import runtime_pb2

from swarmlm.core.loop import LoopThread
from swarmlm.core.membership import Membership, MembershipError
from swarmlm.ledger.chain import Entry, LedgerError
from swarmlm.ledger.store import Ledger

log = logging.getLogger(__name__)

MAX_ENTRIES_PER_CALL = 1000  # a copy far behind catches up over several calls
SYNC_TIMEOUT = 10.0


def _heads_of(raw: bytes) -> dict[str, int]:
    heads = msgpack.unpackb(raw) if raw else {}
    if not isinstance(heads, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in heads.items()):
        raise LedgerError("malformed heads")
    return heads


class LedgerServicer(ServicerBase):
    """Serves this peer's copy to others."""

    def __init__(self, ledger: Ledger, membership: Membership) -> None:
        self.ledger, self.membership = ledger, membership

    async def rpc_ledger_since(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        try:
            await self.membership.require(str(context.remote_id))
            heads = _heads_of(request.metadata)
        except (LedgerError, ValueError, msgpack.UnpackException, MembershipError) as e:
            return runtime_pb2.ExpertResponse(metadata=msgpack.packb({"error": f"ledger sync: {e}"}))
        entries = self.ledger.since(heads)[:MAX_ENTRIES_PER_CALL]
        return runtime_pb2.ExpertResponse(metadata=msgpack.packb([e.to_wire() for e in entries]))

    async def rpc_ledger_push(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        """Entries from a node that serves no copy (a client's accusation, with the entries it builds on):
        each is verified before it is appended, like a pulled one."""
        try:
            await self.membership.require(str(context.remote_id))
            rows = msgpack.unpackb(request.metadata) if request.metadata else []
            if not isinstance(rows, list) or len(rows) > MAX_ENTRIES_PER_CALL:
                raise LedgerError(f"expected a list of at most {MAX_ENTRIES_PER_CALL} entries")
            added = self.ledger.merge(Entry.from_wire(row) for row in rows)
        except (LedgerError, ValueError, msgpack.UnpackException, MembershipError) as e:
            return runtime_pb2.ExpertResponse(metadata=msgpack.packb({"error": f"ledger push: {e}"}))
        return runtime_pb2.ExpertResponse(metadata=msgpack.packb({"added": added}))


async def push(p2p: P2P, ledger: Ledger, peer_id: str) -> int:
    """Send our copy's entries to `peer_id` (it skips what it holds); how many it added. LedgerError if
    it refused them."""
    stub: Any = LedgerServicer.get_stub(p2p, PeerID.from_base58(peer_id))
    rows = [e.to_wire() for e in ledger.entries[-MAX_ENTRIES_PER_CALL:]]
    request = runtime_pb2.ExpertRequest(metadata=msgpack.packb(rows))
    reply = msgpack.unpackb((await stub.rpc_ledger_push(request, timeout=SYNC_TIMEOUT)).metadata)
    if not isinstance(reply, dict) or "added" not in reply:
        raise LedgerError(f"peer {peer_id} answered: {reply.get('error') if isinstance(reply, dict) else reply!r}")
    return int(reply["added"])


async def pull(p2p: P2P, ledger: Ledger, peer_id: str) -> int:
    """Fetch and append what `peer_id`'s copy has and ours lacks; returns how many entries were added.
    Raises LedgerError (a bad entry: what came before it is kept) or hivemind's errors (unreachable)."""
    stub: Any = LedgerServicer.get_stub(p2p, PeerID.from_base58(peer_id))
    added = 0
    while True:
        request = runtime_pb2.ExpertRequest(metadata=msgpack.packb(ledger.heads()))
        reply = await stub.rpc_ledger_since(request, timeout=SYNC_TIMEOUT)
        rows = msgpack.unpackb(reply.metadata) if reply.metadata else []
        if not isinstance(rows, list):
            raise LedgerError(f"peer {peer_id} answered: {rows.get('error') if isinstance(rows, dict) else rows!r}")
        n = ledger.merge(Entry.from_wire(row) for row in rows)
        added += n
        if len(rows) < MAX_ENTRIES_PER_CALL or n == 0:
            return added


class LedgerSync:
    """A copy of the ledger served to other peers and refreshed from them, on a peer's P2P loop."""

    def __init__(
        self, ledger: Ledger, loop: LoopThread, p2p: P2P, membership: Membership, start_timeout: float = 60.0
    ) -> None:
        self.ledger, self.loop, self.p2p = ledger, loop, p2p
        loop.run(LedgerServicer(ledger, membership).add_p2p_handlers(p2p), start_timeout)

    def pull_from_any(self, peer_ids: Sequence[str]) -> int:
        """Pull from one of `peer_ids`, picked at random (so copies converge like gossip). A peer that
        is unreachable or sends a bad entry is logged and skipped: the next call tries another."""
        if not peer_ids:
            return 0
        source = random.choice(list(peer_ids))
        try:
            added = self.loop.run(pull(self.p2p, self.ledger, source), SYNC_TIMEOUT * 2)
        except LedgerError as e:
            log.warning("ledger sync: peer %s sent a bad entry (%s); kept what verified", source, e)
            return 0
        except Exception as e:  # unreachable or slow
            log.info("ledger sync with %s failed: %s", source, e)
            return 0
        if added:
            log.info("ledger: %d entries from %s", added, source)
        return added
