"""Private swarms with real peers on loopback: members serve each other; an outsider can store no DHT
record and get no inference step or ledger entry out of a member; bad certificates are clear errors."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgpack
import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2, runtime_pb2

from swarmlm.core.dht import start_dht
from swarmlm.core.identity import Identity
from swarmlm.core.keys import members_key, model_key
from swarmlm.core.loop import LoopThread
from swarmlm.core.membership import Certificate, MembershipError, load_membership
from swarmlm.engine.sampling import SamplingParams
from swarmlm.launch.peers import PeerProcess, stop_all
from swarmlm.launch.trainers import start_run
from swarmlm.ledger.sync import LedgerServicer
from swarmlm.swarm.client import ClientConfig, RemoteModel
from swarmlm.swarm.messages import RemoteError, StepRequest, read_response
from swarmlm.swarm.records import fetch_records
from swarmlm.swarm.servicer import SpanServicer
from swarmlm.train.allreduce import RobustAverager
from swarmlm.train.data import default_corpus_files, prepare

pytestmark = pytest.mark.slow


def cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "swarmlm.cli", "swarm", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An owner and five members' keys and certificates: the owner and member a made with the CLI as a
    user would, the others with the same functions in-process (each CLI call starts a Python)."""
    folder = tmp_path_factory.mktemp("swarm")
    paths = {"owner": folder / "owner.key"}
    swarm_id = cli("init", "--out", str(paths["owner"]))
    owner = Identity.load(paths["owner"])
    assert swarm_id == owner.peer_id
    for name in ("a", "b", "client", "t0", "t1"):
        key = paths[name] = folder / f"{name}.key"
        cert = paths[f"{name}.cert"] = folder / f"{name}.cert"
        if name == "a":
            peer_id = cli("id", str(key))
            cli("invite", peer_id, "--owner", str(paths["owner"]), "--out", str(cert), "--expires", "1h")
            assert peer_id == Identity.load(key).peer_id
        else:
            Certificate.issue(owner, Identity.load_or_create(key).peer_id, 3600).save(cert)
    return paths


@pytest.fixture(scope="module")
def members(keys: dict[str, Path]) -> Iterator[list[PeerProcess]]:
    peers: list[PeerProcess] = []
    try:
        a = PeerProcess("--layers", "0:15", "--identity", str(keys["a"]), "--swarm-cert", str(keys["a.cert"]))
        peers.append(a.wait_address())
        b = PeerProcess(
            "--layers", "15:30", "--identity", str(keys["b"]), "--swarm-cert", str(keys["b.cert"]), initial=a.maddr
        )
        peers.append(b)
        for p in peers:
            p.wait_ready()
        yield peers
    finally:
        stop_all(peers)


def test_members_serve_a_member_client(members: list[PeerProcess], keys: dict[str, Path]) -> None:
    config = ClientConfig(identity=str(keys["client"]), swarm_cert=str(keys["client.cert"]), route_timeout=60)
    with RemoteModel(initial_peers=[members[0].maddr], config=config) as remote:
        deadline = time.monotonic() + 60
        while len(remote.records()) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert {r.peer_id for r in remote.records()} == {p.peer_id for p in members}
        ids = remote.generate(remote.tokenizer.encode("The capital of France is"), SamplingParams(max_tokens=3))
        assert len(ids) == 3


def test_an_outsider_gets_nothing_in(members: list[PeerProcess], keys: dict[str, Path]) -> None:
    """No certificate: its DHT records are refused, its inference and ledger calls are answered with an
    error, and it cannot read the members' records either."""
    outsider = start_dht([members[0].maddr], ["/ip4/127.0.0.1/tcp/0"])
    loop, p2p = LoopThread("outsider"), None
    try:
        swarm_id = Identity.load(keys["owner"]).peer_id
        forged = {"swarm": swarm_id, "peer": str(outsider.peer_id), "issued": 0, "expires": 1e12, "sig": "00" * 64}
        outsider.store(members_key(swarm_id), forged, time.time() + 600, subkey=str(outsider.peer_id))
        outsider.store(model_key("SmolLM2-135M-Instruct"), {"peer_id": "x"}, time.time() + 600, subkey="x")
        member = start_dht(
            [members[0].maddr],
            ["/ip4/127.0.0.1/tcp/0"],
            Identity.load(keys["client"]),
            client=True,
            cert=load_membership(keys["client.cert"], Identity.load(keys["client"])),
        )
        try:
            assert {r.peer_id for r in fetch_records(member, "SmolLM2-135M-Instruct")} == {p.peer_id for p in members}
            listed = member.get(members_key(swarm_id), latest=True)
            assert str(outsider.peer_id) not in (listed.value if listed else {})
        finally:
            member.shutdown()
        assert fetch_records(outsider, "SmolLM2-135M-Instruct") == []  # wrapped values it cannot unwrap

        p2p = loop.run(outsider.replicate_p2p(), 60)

        async def infer() -> torch.Tensor:
            stub = SpanServicer.get_stub(p2p, PeerID.from_base58(members[0].peer_id))
            header = {"session_id": "s", "model_id": "SmolLM2-135M-Instruct", "start": 0, "end": 15, "max_length": 8}
            request = StepRequest.single(torch.zeros(1, 576), 0, header).to_proto()
            stream = await stub.rpc_inference(aiter_of(request))
            return read_response(await anext(stream))

        with pytest.raises(RemoteError, match="not a member"):
            loop.run(infer(), 60)

        async def ledger() -> dict:
            stub = LedgerServicer.get_stub(p2p, PeerID.from_base58(members[1].peer_id))
            reply = await stub.rpc_ledger_since(runtime_pb2.ExpertRequest(metadata=msgpack.packb({})), timeout=30)
            return msgpack.unpackb(reply.metadata)

        assert "not a member" in loop.run(ledger(), 60)["error"]
    finally:
        loop.stop(p2p)  # and the P2P replica it made
        outsider.shutdown()


async def aiter_of(*items: runtime_pb2.ExpertRequest) -> AsyncIterator[runtime_pb2.ExpertRequest]:
    for item in items:
        yield item
        await asyncio.sleep(0)


def test_bad_certificates_are_clear_errors(keys: dict[str, Path], tmp_path: Path) -> None:
    owner, a = Identity.load(keys["owner"]), Identity.load(keys["a"])
    expired = Certificate.issue(owner, a.peer_id, lifetime=0.01)
    expired.save(tmp_path / "expired.cert")
    time.sleep(0.05)
    with pytest.raises(MembershipError, match="expired"):
        load_membership(tmp_path / "expired.cert", a)
    with pytest.raises(MembershipError, match="use --identity"):
        load_membership(keys["b.cert"], a)  # b's certificate, a's key
    forged = Certificate.issue(Identity.generate(), a.peer_id, 3600)  # signed by someone else
    Certificate(owner.peer_id, a.peer_id, forged.issued, forged.expires, forged.sig).save(tmp_path / "forged.cert")
    with pytest.raises(MembershipError, match="not signed by the swarm's owner"):
        load_membership(tmp_path / "forged.cert", a)
    cmd = [sys.executable, "-m", "swarmlm.cli", "peer", "--identity", str(keys["a"]), "--swarm-cert"]
    done = subprocess.run([*cmd, str(tmp_path / "expired.cert")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "expired" in done.stderr, done.stderr


def test_members_train_together_and_an_outsider_cannot_join_or_download(keys: dict[str, Path], tmp_path: Path) -> None:
    """Two members average every round; an outsider asking a member's averager to join its group or for
    the training state is refused."""
    data = tmp_path / "data"
    prepare(default_corpus_files()[:2], data, train_tokenizer=512, block_size=64)
    args = ("--run-id", "private", "--rounds", "2", "--inner-steps", "5", "--batch-size", "4")
    args += ("--matchmaking-time", "1.5", "--linger", "2", "--target-group-size", "2", "--min-group-size", "2")
    per_peer = {r: ("--identity", str(keys[f"t{r}"]), "--swarm-cert", str(keys[f"t{r}.cert"])) for r in (0, 1)}
    peers = start_run(data, tmp_path / "run", 2, args, per_peer)
    outsider = start_dht([peers[0].maddr], ["/ip4/127.0.0.1/tcp/0"])
    loop, p2p = LoopThread("outsider"), None
    try:
        p2p = loop.run(outsider.replicate_p2p(), 60)
        stub = RobustAverager.get_stub(p2p, PeerID.from_base58(peers[0].peer_id), namespace="private")

        async def join() -> list[averaging_pb2.MessageFromLeader]:
            request = averaging_pb2.JoinRequest(schema_hash=b"", expiration=time.time() + 30, group_key="private.0b")
            return [m async for m in await stub.rpc_join_group(request)]

        async def download() -> list[averaging_pb2.DownloadData]:
            return [m async for m in await stub.rpc_download_state(averaging_pb2.DownloadRequest())]

        assert [m.code for m in loop.run(join(), 60)] == [averaging_pb2.PROTOCOL_VIOLATION]
        assert loop.run(download(), 60) == []
        for p in peers:
            assert p.finish(300) == 0, p.log.read_text()[-3000:]
        for p in peers:
            assert [r["group_size"] for r in p.rounds() if r["averaged"]] == [2, 2]
    finally:
        loop.stop(p2p)  # and the P2P replica it made
        outsider.shutdown()
        stop_all(peers)
