"""The ledger: Ed25519 identities that the libp2p daemon accepts, signed hash-linked entries, copies that
merge, torn writes recovered, and `swarmlm ledger verify` catching every kind of tampering."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from swarmlm.core.dht import start_dht
from swarmlm.core.identity import Identity, IdentityError, verify
from swarmlm.ledger.chain import Entry, LedgerError, verify_chain
from swarmlm.ledger.store import Ledger, read_lines, verify_file
from swarmlm.model.loading import DEFAULT_MODEL_ID, checkpoint_digests, load_model
from swarmlm.swarm.versions import expected_digest, model_version, version_body


def test_identity_file_is_the_peers_libp2p_identity(tmp_path: Path) -> None:
    key = tmp_path / "keys" / "peer.key"
    identity = Identity.load_or_create(key)
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert Identity.load_or_create(key).peer_id == identity.peer_id  # persistent
    dht = start_dht([], ["/ip4/127.0.0.1/tcp/0"], identity=identity)
    try:
        assert str(dht.peer_id) == identity.peer_id  # the daemon proves on every stream the id we sign with
    finally:
        dht.shutdown()
    sig = identity.sign(b"round 3")
    assert verify(identity.peer_id, b"round 3", sig)
    assert not verify(identity.peer_id, b"round 4", sig)
    assert not verify(Identity.generate().peer_id, b"round 3", sig)


def test_bad_key_files_are_named(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(os.urandom(40))
    with pytest.raises(IdentityError, match=r"garbage\.key"):
        Identity.load(garbage)
    with pytest.raises(IdentityError, match="cannot read"):
        Identity.load(tmp_path / "missing.key")
    assert not verify("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", b"x", b"y")  # an RSA-style id cannot sign


def two_peer_ledger(tmp_path: Path) -> tuple[Path, list[Entry]]:
    """Two peers write into their own copies and sync both ways; returns one copy and its entries."""
    a, b = Identity.generate(), Identity.generate()
    with Ledger(tmp_path / "a.jsonl", a) as la, Ledger(tmp_path / "b.jsonl", b) as lb:
        la.append("join", {"span": [0, 15]})
        lb.append("join", {"span": [15, 30]})  # concurrent with a's: both link to the genesis
        for r in range(3):
            la.append("training_round", {"round": r, "participants": [a.peer_id, b.peer_id], "rule": "mean"})
            lb.merge(la.since(lb.heads()))
            lb.append("attestation", {"model": "m", "span": [15, 30], "digest": f"{r:064x}"})
            la.merge(lb.since(la.heads()))
        la.append("leave", {})
        lb.merge(la.since(lb.heads()))
        assert {e.hash for e in la.entries} == {e.hash for e in lb.entries}
        assert la.since(lb.heads()) == [] and lb.since(la.heads()) == []
        return tmp_path / "a.jsonl", list(la.entries)


def test_copies_merge_and_verify(tmp_path: Path) -> None:
    path, entries = two_peer_ledger(tmp_path)
    assert len(entries) == 9  # a: join, 3 rounds, leave; b: join, 3 attestations
    assert verify_file(path).ok and verify_file(tmp_path / "b.jsonl").ok
    with Ledger(path) as reopened:
        assert reopened.entries == entries
        with pytest.raises(LedgerError, match="no identity"):
            reopened.append("join", {})
    with Ledger(path), pytest.raises(LedgerError, match="another process"):
        Ledger(path)


def test_merge_refuses_a_forged_entry_and_keeps_what_came_before(tmp_path: Path) -> None:
    a, mallory = Identity.generate(), Identity.generate()
    with Ledger(tmp_path / "a.jsonl", a) as la, Ledger(tmp_path / "c.jsonl") as copy:
        first = la.append("join", {})
        unsigned = Entry(a.peer_id, 1, first.hash, 1.0, "accusation", {"peer": "x"}, sig="")
        forged = Entry(
            a.peer_id, 1, first.hash, 1.0, "accusation", {"peer": "x"}, mallory.sign(unsigned.signed_bytes()).hex()
        )
        with pytest.raises(LedgerError, match="bad signature"):
            copy.merge([first, forged])
        assert copy.entries == [first]


def test_torn_last_entry_is_dropped_and_nothing_else_is_lost(tmp_path: Path) -> None:
    path, entries = two_peer_ledger(tmp_path)
    whole = path.read_bytes()
    path.write_bytes(whole + whole.splitlines(keepends=True)[3][:57])  # a crash mid-append
    items, torn = read_lines(path)
    assert torn and verify_chain(items).ok  # verify ignores a torn tail
    author = Identity.generate()
    with Ledger(path, author) as ledger:
        assert ledger.entries == entries
        ledger.append("join", {})
    assert path.read_bytes().startswith(whole) and verify_file(path).entries == len(entries) + 1


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _modify_body(rows: list[dict]) -> int:
    rows[4]["body"]["round"] = 7
    return 5


def _modify_and_rehash(rows: list[dict]) -> int:  # a careful forger recomputes the hash; the signature still fails
    rows[4]["body"]["rule"] = "trimmed_mean"
    rows[4]["hash"] = Entry(**{k: v for k, v in rows[4].items() if k != "hash"}).hash
    return 5


def _delete(rows: list[dict]) -> int:
    del rows[4]
    return 5


def _swap(rows: list[dict]) -> int:
    rows[3], rows[4] = rows[4], rows[3]
    return 4


def _move_to_end(rows: list[dict]) -> int:
    rows.append(rows.pop(2))
    return 3


def _insert_forged(rows: list[dict]) -> int:
    """Mallory writes an entry in a's name, signed with her own key."""
    mallory = Identity.generate()
    fake = dict(rows[4], body={"peer": "b", "reason": "lied"}, kind="accusation")
    unsigned = Entry(**{k: v for k, v in fake.items() if k not in ("hash", "sig")}, sig="")
    signed = {k: v for k, v in unsigned.to_wire().items() if k not in ("hash", "sig")}
    rows.insert(5, Entry(**signed, sig=mallory.sign(unsigned.signed_bytes()).hex()).to_wire())
    return 6


def _insert_replay(rows: list[dict]) -> int:
    rows.insert(7, rows[2])
    return 8


def _flip_signature(rows: list[dict]) -> int:
    sig = rows[6]["sig"]
    rows[6]["sig"] = sig[:-2] + ("00" if sig[-2:] != "00" else "01")
    return 7


def _garble_line(rows: list[dict]) -> int:
    rows[1] = {"not": "an entry"}
    return 2


TAMPERINGS: dict[str, Callable[[list[dict]], int]] = {
    "modified": _modify_body,
    "modified and rehashed": _modify_and_rehash,
    "deleted": _delete,
    "reordered (swap)": _swap,
    "reordered (moved)": _move_to_end,
    "inserted forgery": _insert_forged,
    "inserted replay": _insert_replay,
    "bad signature": _flip_signature,
    "garbled line": _garble_line,
}


@pytest.mark.parametrize("name", list(TAMPERINGS))
def test_verify_names_the_first_bad_entry(tmp_path: Path, name: str) -> None:
    path, _ = two_peer_ledger(tmp_path)
    rows = _lines(path)
    first_bad = TAMPERINGS[name](rows)
    _write(path, rows)
    verdict = verify_file(path)
    assert verdict.first_bad == first_bad, verdict
    with pytest.raises(LedgerError, match=f"entry {first_bad} is bad"):
        Ledger(path)  # a tampered copy refuses to grow


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "swarmlm.cli", "ledger", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})


def test_cli_show_and_verify(tmp_path: Path) -> None:
    path, entries = two_peer_ledger(tmp_path)
    ok = run_cli("verify", str(path))
    assert ok.returncode == 0 and "ok: 9 entries" in ok.stdout, ok.stdout + ok.stderr
    shown = run_cli("show", str(path), "--kind", "training_round")
    assert shown.returncode == 0 and shown.stdout.count("│ training_round") == 3, shown.stdout
    assert entries[-1].hash[:12] in run_cli("show", str(path), "--last", "1").stdout
    rows = _lines(path)
    _delete(rows)
    _write(path, rows)
    bad = run_cli("verify", str(path))
    assert bad.returncode == 1 and "entry 5 is bad" in bad.stderr, bad.stderr
    missing = run_cli("verify", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and "no ledger at" in missing.stderr


def test_cli_verify_against_another_copy_finds_dropped_newest_entries(tmp_path: Path) -> None:
    path, entries = two_peer_ledger(tmp_path)
    other = tmp_path / "b.jsonl"  # the other peer's full copy
    same = run_cli("verify", str(path), "--against", str(other))
    assert same.returncode == 0 and "holds every entry" in same.stdout, same.stdout + same.stderr
    _write(path, _lines(path)[:-2])  # a valid prefix: alone it verifies
    assert run_cli("verify", str(path)).returncode == 0
    short = run_cli("verify", str(path), "--against", str(other))
    assert short.returncode == 1 and "lacks 2 entries" in short.stderr, short.stdout + short.stderr
    assert entries[-2].author in short.stderr
    assert run_cli("verify", str(other), "--against", str(path)).returncode == 0  # behind is not wrong
    # The newest entry's author re-signs a different one at the same number: a fork.
    forked = tmp_path / "forked.jsonl"
    author = Identity.generate()
    with Ledger(tmp_path / "c.jsonl", author) as lc, Ledger(forked, author) as ld:
        lc.append("join", {"span": [0, 30]})
        ld.append("join", {"span": [0, 15]})
    fork = run_cli("verify", str(tmp_path / "c.jsonl"), "--against", str(forked))
    assert fork.returncode == 1 and "signed two different entries #0" in fork.stderr, fork.stderr


def test_model_version_is_the_most_signed_and_fits_a_served_span() -> None:
    """Per-layer digests of the checkpoint compose into the digest a peer serving any span announces;
    of two competing versions the one more authors signed counts, unless the client names whom it trusts."""
    parts = checkpoint_digests(None)
    served = load_model(layers=(3, 7), edges=False, device="cpu", quant="int8")
    real = version_body(DEFAULT_MODEL_ID, parts)
    fake = version_body(DEFAULT_MODEL_ID, {**parts, "layer.5": "0" * 64})
    view = Ledger(None)  # a client's copy, in memory
    signers = [Identity.generate() for _ in range(3)]
    for signer, body in zip(signers, [real, fake, real], strict=True):
        with Ledger(None, signer) as copy:
            copy.append("model_version", body)
            view.merge(copy.entries)
    version = model_version(view.entries, DEFAULT_MODEL_ID)
    assert version is not None and expected_digest(version, 3, 7) == served.digest
    assert expected_digest(version, 25, 31) is None  # past the model's layers
    pinned = model_version(view.entries, DEFAULT_MODEL_ID, trusted=[signers[1].peer_id])
    assert pinned is not None and expected_digest(pinned, 3, 7) != served.digest
    assert model_version(view.entries, "another-model") is None
