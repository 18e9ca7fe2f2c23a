"""Private swarms: an owner key, membership certificates, and the checks that keep non-members out.

`swarmlm swarm init` makes the owner's Ed25519 key; the swarm's id is the owner's peer id.
`swarmlm swarm invite PEER_ID` signs a certificate: (swarm, peer, expires). A peer started with
`--swarm-cert FILE` is in private mode:

- DHT: every record it stores is wrapped with its certificate and its own signature over the record
  (`MembershipValidator`); every member's DHT node rejects a record whose wrapper does not verify, so a
  non-member can store nothing (no span records, no averaging groups) and reads nothing it can unwrap.
- P2P: each member publishes its certificate in the DHT; a handler asks `Membership.admits(remote)`
  before serving anything (libp2p has already proven the remote's peer id on the stream).

An open swarm (no certificate) works as before.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
from hivemind import DHT
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time

from swarmlm.core.dht import DHT_TIMEOUT
from swarmlm.core.encoding import canonical
from swarmlm.core.identity import Identity, IdentityError, verify
from swarmlm.core.keys import members_key

MEMBER_CACHE_SECONDS = 30.0  # how long a positive membership answer is trusted before asking the DHT again
CERT_RECORD_TTL = 300.0  # a member's certificate entry lives this long; `publish` refreshes it at half-life


class MembershipError(PermissionError):
    """A certificate that is malformed, forged, expired or not for this swarm, or a non-member's call."""


@dataclass(frozen=True)
class Certificate:
    swarm: str  # the owner's peer id
    peer: str  # the member's peer id
    issued: float
    expires: float
    sig: str  # hex, by the owner

    def signed_bytes(self) -> bytes:
        return canonical({"swarm": self.swarm, "peer": self.peer, "issued": self.issued, "expires": self.expires})

    @classmethod
    def issue(cls, owner: Identity, peer: str, lifetime: float) -> Certificate:
        from swarmlm.core.identity import public_key_of

        public_key_of(peer)  # IdentityError unless an Ed25519 peer id
        issued = time.time()
        unsigned = cls(owner.peer_id, peer, issued, issued + lifetime, "")
        return cls(owner.peer_id, peer, issued, issued + lifetime, owner.sign(unsigned.signed_bytes()).hex())

    def check(self, swarm: str, peer: str | None = None, now: float | None = None) -> None:
        """MembershipError unless this is a valid, unexpired certificate of `swarm` (for `peer`)."""
        if self.swarm != swarm:
            raise MembershipError(f"certificate is for swarm {self.swarm}, not {swarm}")
        if peer is not None and self.peer != peer:
            raise MembershipError(f"certificate is for peer {self.peer}, not {peer}")
        try:
            signature = bytes.fromhex(self.sig)
        except ValueError:
            raise MembershipError("certificate signature is not hex") from None
        if not verify(self.swarm, self.signed_bytes(), signature):
            raise MembershipError("certificate is not signed by the swarm's owner")
        if (time.time() if now is None else now) >= self.expires:
            raise MembershipError(f"certificate of {self.peer} expired at {time.ctime(self.expires)}")

    def to_wire(self) -> dict[str, Any]:
        return {"swarm": self.swarm, "peer": self.peer, "issued": self.issued, "expires": self.expires, "sig": self.sig}

    @classmethod
    def from_wire(cls, value: Any) -> Certificate:
        try:
            cert = cls(**value)
        except TypeError:
            raise MembershipError("not a membership certificate") from None
        numbers = all(isinstance(x, int | float) and not isinstance(x, bool) for x in (cert.issued, cert.expires))
        if not numbers or not all(isinstance(x, str) for x in (cert.swarm, cert.peer, cert.sig)):
            raise MembershipError("malformed membership certificate")
        return cert

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_wire(), indent=2) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> Certificate:
        try:
            return cls.from_wire(json.loads(Path(path).read_text()))
        except OSError as e:
            raise MembershipError(f"cannot read certificate {path}: {e.strerror}") from None
        except (ValueError, MembershipError) as e:
            raise MembershipError(f"{path} is not a membership certificate ({e})") from None


def load_membership(cert_path: str | Path, identity: Identity) -> Certificate:
    """The certificate of `--swarm-cert`, checked against this peer's identity now, so a wrong or expired
    one is one clear error at start."""
    cert = Certificate.load(cert_path)
    try:
        cert.check(cert.swarm, identity.peer_id)
    except MembershipError as e:
        raise MembershipError(
            f"{cert_path}: {e} (this peer is {identity.peer_id}: use --identity with its key)"
        ) from None
    return cert


class MembershipValidator(RecordValidatorBase):
    """Signs our DHT records as a member; accepts only records that a member signed."""

    def __init__(self, cert: Certificate, identity: Identity) -> None:
        self.cert, self.identity = cert, identity

    @staticmethod
    def _payload(record: DHTRecord, value: bytes) -> bytes:
        return msgpack.packb([record.key, record.subkey, value, record.expiration_time])

    def sign_value(self, record: DHTRecord) -> bytes:
        signature = self.identity.sign(self._payload(record, record.value))
        return msgpack.packb([record.value, self.cert.to_wire(), signature])

    def validate(self, record: DHTRecord) -> bool:
        try:
            value, cert_wire, signature = msgpack.unpackb(record.value)
            cert = Certificate.from_wire(cert_wire)
            cert.check(self.cert.swarm)
            return verify(cert.peer, self._payload(record, value), signature)
        except (ValueError, TypeError, MembershipError, IdentityError, msgpack.UnpackException):
            return False

    def strip_value(self, record: DHTRecord) -> bytes:
        return msgpack.unpackb(record.value)[0]

    @property
    def priority(self) -> int:
        return 100  # signs last and validates first: the wrapper is the outermost layer

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False


class Membership:
    """Who may talk to us. Open swarm (no certificate): everyone. Private: peers whose certificate is in the DHT."""

    def __init__(self, dht: DHT, cert: Certificate | None) -> None:
        self.dht, self.cert = dht, cert
        self._admitted: dict[str, float] = {}  # peer id -> until when (our cache)
        self._published = 0.0  # expiry of the certificate entry we last stored

    @property
    def private(self) -> bool:
        return self.cert is not None

    def publish(self) -> bool:
        """Store our certificate where members look it up. Cheap to call often (every heartbeat, every
        route): it stores again only once the stored entry is past half its life."""
        if self.cert is None:
            return True
        now = get_dht_time()
        expires = min(self.cert.expires, now + CERT_RECORD_TTL)
        if self._published - now > CERT_RECORD_TTL / 2 or expires <= self._published:
            return True  # (the DHT would refuse an entry that expires no later than the stored one anyway)
        key = members_key(self.cert.swarm)
        future = self.dht.store(key, self.cert.to_wire(), expires, subkey=self.cert.peer, return_future=True)
        if stored := bool(future.result(timeout=DHT_TIMEOUT)):
            self._published = expires
        return stored

    async def admits(self, peer_id: str) -> bool:
        if self.cert is None or peer_id == self.cert.peer:
            return True
        now = time.monotonic()
        if self._admitted.get(peer_id, 0.0) > now:
            return True
        future = self.dht.get(members_key(self.cert.swarm), latest=True, return_future=True)
        try:
            found = await asyncio.wait_for(asyncio.wrap_future(future), DHT_TIMEOUT)
        except TimeoutError:
            return False
        entry = found.value.get(peer_id) if found is not None and isinstance(found.value, dict) else None
        try:
            cert = Certificate.from_wire(entry.value) if entry is not None else None
            if cert is None:
                return False
            cert.check(self.cert.swarm, peer_id)
        except MembershipError:
            return False
        self._admitted[peer_id] = min(now + MEMBER_CACHE_SECONDS, now + cert.expires - time.time())
        return True

    async def require(self, peer_id: str) -> None:
        if not await self.admits(peer_id):
            raise MembershipError(
                f"peer {peer_id} is not a member of private swarm {self.cert.swarm if self.cert else ''}"
            )
