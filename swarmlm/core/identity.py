"""A peer's Ed25519 identity: the libp2p key file that fixes its peer id, and signatures made with it.

The file is libp2p's own format (a `crypto_pb2.PrivateKey` protobuf holding seed || public key), so the
same file that the p2p daemon reads to prove who we are on every stream also signs our ledger entries,
and anyone can check a signature against a peer id alone: an Ed25519 peer id *is* its public key
(libp2p's identity multihash), so no key directory is needed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hivemind.proto import crypto_pb2

from swarmlm.core.files import atomic_write

_IDENTITY_MULTIHASH = b"\x00"  # multihash code 0x00: the digest is the key itself (keys of <= 42 bytes)


class IdentityError(ValueError):
    """A key file or peer id that cannot be used; the message says which and why."""


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def peer_id_of(key: Ed25519PublicKey) -> str:
    """The libp2p peer id (base58) of an Ed25519 public key."""
    proto = crypto_pb2.PublicKey(key_type=crypto_pb2.KeyType.Ed25519, data=_raw_public(key)).SerializeToString()
    return base58.b58encode(_IDENTITY_MULTIHASH + bytes([len(proto)]) + proto).decode()


def public_key_of(peer_id: str) -> Ed25519PublicKey:
    """The public key inside an Ed25519 peer id; IdentityError for any other kind of id."""
    try:
        raw = base58.b58decode(peer_id)
    except ValueError:
        raise IdentityError(f"{peer_id!r} is not a base58 peer id") from None
    if len(raw) < 2 or raw[:1] != _IDENTITY_MULTIHASH or raw[1] != len(raw) - 2:
        raise IdentityError(f"peer id {peer_id!r} does not embed an Ed25519 key (RSA identities cannot sign here)")
    proto = crypto_pb2.PublicKey.FromString(raw[2:])
    if proto.key_type != crypto_pb2.KeyType.Ed25519 or len(proto.data) != 32:
        raise IdentityError(f"peer id {peer_id!r} does not embed an Ed25519 key")
    return Ed25519PublicKey.from_public_bytes(proto.data)


def verify(peer_id: str, data: bytes, signature: bytes) -> bool:
    """Whether `signature` over `data` was made by the holder of `peer_id`'s key."""
    try:
        public_key_of(peer_id).verify(signature, data)
        return True
    except (IdentityError, InvalidSignature):
        return False


@dataclass(frozen=True)
class Identity:
    key: Ed25519PrivateKey
    path: Path | None = None

    @property
    def peer_id(self) -> str:
        return peer_id_of(self.key.public_key())

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | Path) -> Identity:
        path = Path(path)
        try:
            proto = crypto_pb2.PrivateKey.FromString(path.read_bytes())
        except OSError as e:
            raise IdentityError(f"cannot read key file {path}: {e.strerror}") from None
        except Exception:  # protobuf's DecodeError
            raise IdentityError(f"{path} is not a libp2p key file") from None
        if proto.key_type != crypto_pb2.KeyType.Ed25519 or len(proto.data) != 64:
            raise IdentityError(f"{path} holds a {crypto_pb2.KeyType.Name(proto.key_type)} key, not Ed25519")
        key = Ed25519PrivateKey.from_private_bytes(proto.data[:32])
        if _raw_public(key.public_key()) != proto.data[32:]:
            raise IdentityError(f"{path} is corrupt: its public half does not match its private half")
        return cls(key, path)

    @classmethod
    def from_option(cls, path: str | Path | None) -> Identity:
        """`--identity FILE` (created if missing), or a fresh identity for this run."""
        return cls.load_or_create(path) if path is not None else cls.generate()

    @contextmanager
    def key_file(self) -> Iterator[Path]:
        """A key file for the p2p daemon to read at start: ours, or a private temporary one."""
        if self.path is not None:
            yield self.path
            return
        with tempfile.TemporaryDirectory(prefix="swarmlm-identity-") as folder:
            path = Path(folder) / "peer.key"
            self.save(path)
            yield path

    @classmethod
    def load_or_create(cls, path: str | Path) -> Identity:
        """The identity in `path`, made (readable by its owner only, written atomically) if absent."""
        path = Path(path)
        if path.exists():
            return cls.load(path)
        identity = cls.generate()
        identity.save(path)
        return cls(identity.key, path)

    def save(self, path: Path) -> None:
        seed = self.key.private_bytes_raw()
        proto = crypto_pb2.PrivateKey(
            key_type=crypto_pb2.KeyType.Ed25519, data=seed + _raw_public(self.key.public_key())
        )
        atomic_write(path, proto.SerializeToString(), mode=0o600)
