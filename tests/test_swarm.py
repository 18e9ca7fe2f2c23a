"""The swarm with real peer processes on loopback: discovery, routing, identical output, failover."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from swarmlm.core.sizes import KV_RESERVE_TOKENS
from swarmlm.engine.engine import Engine, EngineConfig
from swarmlm.engine.sampling import SamplingParams
from swarmlm.engine.scheduler import make_scheduler
from swarmlm.engine.sequence import FinishReason, Sequence
from swarmlm.launch.peers import PeerProcess, alive, start_swarm, stop_all
from swarmlm.ledger.chain import Entry
from swarmlm.ledger.store import ledger_path, read_lines, verify_file
from swarmlm.model.loading import DEFAULT_MODEL_ID, LoadedModel, default_model_path, load_model, resolve_device
from swarmlm.model.memory import device_label
from swarmlm.swarm.client import ClientConfig, RemoteModel
from swarmlm.swarm.routing import NoRouteError, better_span, choose_span, find_route, format_layers
from swarmlm.swarm.span_record import SpanRecord

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a quiet village,",
    "Die Hauptstadt von Deutschland ist",  # non-English text
]


@pytest.fixture(scope="module")
def swarm() -> Iterator[dict[str, PeerProcess]]:
    """Layers 0:10 and 20:30 fixed; a late `auto` peer must fill the hole 10:20 with the 10 layers its
    --max-memory holds; a fourth peer serves 10:20 again, so the middle span has a spare for failover."""
    peers: dict[str, PeerProcess] = {}
    try:
        peers["a"] = PeerProcess("--layers", "0:10").wait_address()
        boot = peers["a"].maddr
        peers["c"] = PeerProcess("--layers", "20:30", initial=boot)
        peers["a"].wait_ready()
        peers["c"].wait_ready()
        # --rebalance-period 0: it stays where it chose to start. Left to rebalance (every 60 s by default),
        # it once moved to 0:10 mid-module, when peer a's measured throughput was low on a busy machine,
        # and took the middle span's spare away. Moving has its own test below.
        auto = ("--layers", "auto", "--max-memory", AUTO_MEMORY, "--rebalance-period", "0")
        peers["b"] = PeerProcess(*auto, initial=boot).wait_ready()
        peers["d"] = PeerProcess("--layers", "10:20", initial=boot).wait_ready()
        yield peers
    finally:
        stop_all(list(peers.values()))


# A SmolLM2 layer in fp32 is 14.2 MB of weights and reserves 12.6 MB of KV (8192 tokens): 26.7 MB. This
# budget holds 10.47 of them, so peer b takes 10 layers.
AUTO_MEMORY = "280MB"
CONTEXT = 64  # the client's max_model_len, and the engine's it is compared with


@pytest.fixture(scope="module")
def client(swarm: dict[str, PeerProcess]) -> Iterator[RemoteModel]:
    config = ClientConfig(step_timeout=20, max_model_len=CONTEXT)
    with RemoteModel(initial_peers=[swarm["a"].maddr], config=config) as remote:
        yield remote


def engine_choices(
    model: LoadedModel, prompt_ids: list[int], params: SamplingParams, n: int = 1, max_model_len: int | None = None
) -> list[Sequence]:
    """The n choices `swarmlm serve`'s engine generates for this request on the whole local model."""
    engine = Engine(model, make_scheduler("fcfs"), EngineConfig(kv_budget_bytes=256 << 20, max_model_len=max_model_len))
    seqs = engine.add(prompt_ids, params, n)
    while engine.has_work:
        engine.step()
    return seqs


def local_greedy(model: LoadedModel, prompt_ids: list[int], max_tokens: int) -> list[int]:
    return engine_choices(model, prompt_ids, SamplingParams(max_tokens=max_tokens, temperature=0))[0].output_ids


def outcome(seqs: list[Sequence]) -> list[tuple[list[int], str, FinishReason | None]]:
    return [(s.output_ids, s.text, s.finish_reason) for s in seqs]


def test_late_peer_fills_the_least_covered_span_with_what_its_memory_holds(swarm: dict[str, PeerProcess]) -> None:
    assert swarm["b"].span() == (10, 20)


def test_records_describe_every_peer(client: RemoteModel, swarm: dict[str, PeerProcess]) -> None:
    records = {r.peer_id: r for r in client.records()}
    for name, span in {"a": (0, 10), "b": (10, 20), "c": (20, 30), "d": (10, 20)}.items():
        r = records[swarm[name].peer_id]
        assert (r.start, r.end) == span
        assert r.throughput > 0 and r.digest and r.free_kv_tokens > 0
        assert r.device == device_label(resolve_device("auto")) and r.memory_budget > 0
    # One machine: every peer announces the same host fingerprint (a gateway pipelines only across machines).
    hosts = {records[p.peer_id].host for p in swarm.values() if p.peer_id in records}
    assert len(hosts) == 1 and "" not in hosts
    b = records[swarm["b"].peer_id]
    assert b.memory_budget == 280_000_000
    assert b.free_kv_tokens == KV_RESERVE_TOKENS  # its KV budget is the reservation of its 10 layers


def test_every_peer_attests_its_span_in_a_ledger_that_syncs(client: RemoteModel, swarm: dict[str, PeerProcess]) -> None:
    """Each peer signs a join and an attestation of the digest it serves; gossip brings every peer's
    entries into every copy, and every copy verifies."""
    digests = {r.peer_id: r.digest for r in client.records()}
    copies = {name: ledger_path(p.peer_id) for name, p in swarm.items()}
    deadline = time.monotonic() + 90
    while True:
        held = {
            name: {(e.author, e.kind) for e in read_lines(path)[0] if isinstance(e, Entry)}
            for name, path in copies.items()
        }
        wanted = {(p.peer_id, kind) for p in swarm.values() for kind in ("join", "attestation")}
        if all(wanted <= h for h in held.values()) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert all(wanted <= h for h in held.values()), {n: len(wanted - h) for n, h in held.items()}
    for path in copies.values():
        assert verify_file(path).ok
    entries = [e for e in read_lines(copies["a"])[0] if isinstance(e, Entry) and e.kind == "attestation"]
    for e in entries:
        assert e.body["digest"] == digests[e.author] and e.body["model"] == client.model_id


def test_swarm_output_matches_the_local_engine(client: RemoteModel, model: LoadedModel) -> None:
    for prompt in PROMPTS:
        ids = model.tokenizer.encode(prompt)
        assert client.generate(ids, SamplingParams(max_tokens=16, temperature=0)) == local_greedy(model, ids, 16)


def altered_copy(folder: Path) -> Path:
    """The embedded model's GGUF file with some of layer 12's weights changed, under a name that gives
    the same model id: a peer serving it claims to serve the model."""
    import gguf

    out = folder / f"{DEFAULT_MODEL_ID}.gguf"
    shutil.copyfile(default_model_path(), out)
    tensor = next(t for t in gguf.GGUFReader(str(out)).tensors if t.name == "blk.12.attn_q.weight")
    with out.open("r+b") as f:
        f.seek(int(tensor.data_offset) + 1000)
        f.write(bytes(b ^ 0x5A for b in f.read(64)))
    return out


def test_a_peer_serving_other_weights_is_never_routed_through(
    client: RemoteModel, swarm: dict[str, PeerProcess], tmp_path: Path
) -> None:
    """The first peer signs the model's version (per-layer digests) into the ledger; a client refuses a
    peer whose announced digest for its span is not that version's, however it got there."""
    liar = PeerProcess("--model", str(altered_copy(tmp_path)), "--layers", "10:20", initial=swarm["a"].maddr)
    try:
        liar.wait_ready()
        deadline = time.monotonic() + 60
        while (
            liar.peer_id not in {r.peer_id for r in client.records()} or client.model_version(client.records()) is None
        ):
            assert time.monotonic() < deadline, "no model version in the ledger, or the liar never announced"
            time.sleep(1)
        honest = {swarm["b"].peer_id, swarm["d"].peer_id}
        assert (
            find_route(client.records(), 0, 30, banned=honest)[1].record.peer_id == liar.peer_id
        )  # it does claim 10:20
        with pytest.raises(NoRouteError, match="layers 10:20 have no live peer"):
            find_route(client.routable_records(), 0, 30, banned=honest)
        assert client.stats.refused_weights == 1
        assert "differ from the ledger's version" in liar.log.read_text()
    finally:
        liar.stop()
    deadline = time.monotonic() + 20
    while liar.peer_id in {r.peer_id for r in client.records()}:
        assert time.monotonic() < deadline, "the liar's record outlived its leave"
        time.sleep(0.5)


def test_seeded_sampling_is_reproducible(client: RemoteModel, model: LoadedModel) -> None:
    ids = model.tokenizer.encode(PROMPTS[1])
    params = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7)
    assert client.generate(ids, params) == client.generate(ids, params)


def test_seeded_choices_and_stop_strings_match_the_engine(client: RemoteModel, model: LoadedModel) -> None:
    """Choice i of n draws from the seed the engine gives choice i; a stop string ends a choice where
    the engine ends it, with the same text."""
    ids = model.tokenizer.encode(PROMPTS[1])
    params = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7, stop=["."])
    got = client.complete(ids, params, n=3)
    assert outcome(got) == outcome(engine_choices(model, ids, params, n=3))
    assert {s.finish_reason for s in got} == {FinishReason.STOP, FinishReason.LENGTH}  # "." ends some, not all
    assert len({s.text for s in got}) == 3
    assert client.generate(ids, params, choice=2) == got[2].output_ids
    greedy = SamplingParams(max_tokens=16, temperature=0, stop=["Elara", "healer"])  # "Elara" spans tokens
    (want,) = engine_choices(model, ids, greedy)
    assert want.finish_reason == FinishReason.STOP and len(want.output_ids) < 16
    assert outcome(client.complete(ids, greedy)) == outcome([want])


def test_the_client_keeps_the_engines_context_limit(client: RemoteModel, model: LoadedModel) -> None:
    ids = model.tokenizer.encode(" ".join(PROMPTS * 3))[: CONTEXT - 6]
    too_long = SamplingParams(max_tokens=7, temperature=0)
    with pytest.raises(ValueError, match=f"exceeds the model's context of {CONTEXT} tokens"):
        engine_choices(model, ids, too_long, max_model_len=CONTEXT)
    with pytest.raises(ValueError, match=f"exceeds the model's context of {CONTEXT} tokens"):
        client.stream(ids, too_long)
    fits = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    (got,) = client.complete(ids, fits)
    assert outcome([got]) == outcome(engine_choices(model, ids, fits, max_model_len=CONTEXT))
    assert got.num_tokens == CONTEXT and got.finish_reason == FinishReason.LENGTH


def test_uncovered_layers_give_a_clear_error(client: RemoteModel, swarm: dict[str, PeerProcess]) -> None:
    with pytest.raises(NoRouteError, match="layers 10:20 have no live peer"):
        find_route(client.records(), 0, 30, banned={swarm["b"].peer_id, swarm["d"].peer_id})


def wait_gone(pids: set[int], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not alive(pids)


def swarmlm_status(boot: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "swarmlm.cli", "status", "--initial-peers", boot]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})


def test_status_shows_peers_and_full_coverage(swarm: dict[str, PeerProcess]) -> None:
    result = swarmlm_status(swarm["a"].maddr)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 live peers" in result.stdout
    b = next(line for line in result.stdout.splitlines() if swarm["b"].peer_id[:16] in line)
    assert "10:20" in b and "280.0 MB" in b and device_label(resolve_device("auto")) in b
    assert "1" * 10 + "2" * 10 + "1" * 10 in result.stdout  # peers per layer: the middle span twice


def test_kill_9_mid_generation_gives_the_same_text(
    client: RemoteModel, swarm: dict[str, PeerProcess], model: LoadedModel
) -> None:
    ids = model.tokenizer.encode(PROMPTS[0])
    expected = local_greedy(model, ids, 24)
    got: list[int] = []
    stream = client.stream(ids, SamplingParams(max_tokens=24, temperature=0))
    for token in stream:
        got.append(token)
        if len(got) == 6:
            # Kill whichever middle peer this session is using, mid-generation, with no warning.
            victim = next(p for p in (swarm["b"], swarm["d"]) if p.peer_id in client.active_peers())
            tree = victim.pids()
            victim.crash()
    assert got == expected
    assert client.stats.failovers >= 1
    # The dead peer's record expires from the DHT within its TTL.
    deadline = time.monotonic() + 25
    while victim.peer_id in {r.peer_id for r in client.records()}:
        assert time.monotonic() < deadline, "a dead peer's record outlived its TTL"
        time.sleep(1)
    assert wait_gone(tree), "the killed peer left processes behind"


def test_status_exit_code_when_layers_are_uncovered(swarm: dict[str, PeerProcess]) -> None:
    for name in ("b", "d"):
        tree = swarm[name].pids()
        swarm[name].leave()  # a clean leave withdraws the record at once
        assert wait_gone(tree), "a peer that left cleanly kept processes running"
    result = swarmlm_status(swarm["a"].maddr)
    assert result.returncode == 1
    assert "layers without a live peer: 10:20" in result.stdout


@pytest.fixture
def two_hosts() -> Iterator[list[tuple[str, str]]]:
    """Two network namespaces joined by a veth pair: (namespace, address) of each "host"."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (ip)")
    hosts = [("swarmlm-ns-a", "10.78.0.1"), ("swarmlm-ns-b", "10.78.0.2")]
    setup = [["ip", "link", "add", "swl-va", "type", "veth", "peer", "name", "swl-vb"]]
    for (ns, ip), dev in zip(hosts, ("swl-va", "swl-vb"), strict=True):
        setup[:0] = [["ip", "netns", "add", ns]]
        setup += [
            ["ip", "link", "set", dev, "netns", ns],
            ["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev],
            ["ip", "-n", ns, "link", "set", dev, "up"],
            ["ip", "-n", ns, "link", "set", "lo", "up"],
        ]
    try:
        for cmd in setup:
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                pytest.skip(f"network namespaces unavailable: {' '.join(cmd)}: {result.stderr.strip()}")
        yield hosts
    finally:
        for ns, _ in hosts:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_two_peers_on_separate_hosts(two_hosts: list[tuple[str, str]], model: LoadedModel) -> None:
    (ns_a, ip_a), (_, ip_b) = two_hosts
    peers = []
    try:
        for (ns, ip), layers in zip(two_hosts, ("0:15", "15:30"), strict=True):
            initial = peers[0].maddr if peers else None
            args = ("--layers", layers, "--host-maddrs", f"/ip4/{ip}/tcp/0")
            peers.append(PeerProcess(*args, initial=initial, prefix=("ip", "netns", "exec", ns)).wait_address())
        for p in peers:
            p.wait_ready()
        assert f"/ip4/{ip_a}/" in peers[0].maddr and f"/ip4/{ip_b}/" in peers[1].maddr
        ids = model.tokenizer.encode(PROMPTS[0])
        # The client runs on host A and reaches host B's peer over the veth link.
        script = (
            "import json, sys; from swarmlm.engine.sampling import SamplingParams; "
            "from swarmlm.swarm.client import RemoteModel; "
            f"m = RemoteModel(initial_peers=[{peers[0].maddr!r}]); "
            f"print(json.dumps(m.generate({ids!r}, SamplingParams(max_tokens=12, temperature=0)))); m.close()"
        )
        cmd = ["ip", "netns", "exec", ns_a, sys.executable, "-c", script]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads(result.stdout.strip().splitlines()[-1]) == local_greedy(model, ids, 12)
    finally:
        stop_all(peers)


def test_spans_that_do_not_line_up(tiny_llama: Path) -> None:
    """Peers 0:3 and 1:4 overlap: the chain must use part of one of them."""
    model = load_model(str(tiny_llama), device="cpu")
    peers = start_swarm(["0:3", "1:4"], ("--model", str(tiny_llama)))
    try:
        with RemoteModel(str(tiny_llama), initial_peers=[peers[0].maddr]) as remote:
            ids = model.tokenizer.encode(PROMPTS[2])
            got, hops = [], []
            for token in remote.stream(ids, SamplingParams(max_tokens=12, temperature=0)):
                got.append(token)
                if not hops:
                    (session,) = remote.sessions
                    hops = list(session.hops)
            assert got == local_greedy(model, ids, 12)
            assert [(h.start, h.end) for h in hops] in ([(0, 1), (1, 4)], [(0, 3), (3, 4)])
    finally:
        stop_all(peers)


def test_auto_peers_rebalance_to_a_hole(tiny_llama: Path) -> None:
    """Three `auto` peers of 2 layers: 0:2, 2:4, and a third on whichever of the two is served slower.
    When the peer alone on its span crashes, one of the other two moves into the hole (and only one: the
    first claims it before the other checks)."""
    auto = ("--model", str(tiny_llama), "--layers", "auto", "--num-layers", "2", "--rebalance-period", "2")
    first = PeerProcess(*auto).wait_ready()
    peers = [first, PeerProcess(*auto, initial=first.maddr).wait_ready()]
    peers.append(PeerProcess(*auto, initial=first.maddr).wait_ready())
    try:
        assert [p.span() for p in peers[:2]] == [(0, 2), (2, 4)]
        lone = next(p for p in peers[:2] if p.span() != peers[2].span())
        lone.crash()
        watch = [first.maddr if lone is not first else peers[2].maddr]
        with RemoteModel(str(tiny_llama), initial_peers=watch) as watcher:
            deadline = time.monotonic() + 90
            while True:
                spans = sorted((r.start, r.end) for r in watcher.records())
                if spans == [(0, 2), (2, 4)]:
                    break
                assert time.monotonic() < deadline, f"no peer moved to the hole: {spans}"
                time.sleep(1)
    finally:
        stop_all(peers)


def test_routing_rules() -> None:
    def rec(peer: str, start: int, end: int, tps: float = 10.0) -> SpanRecord:
        return SpanRecord(peer, "m", start, end, throughput=tps)

    assert choose_span([], 30, 10) == (0, 10)
    assert choose_span([rec("a", 0, 10), rec("c", 20, 30)], 30, 10) == (10, 20)
    assert choose_span([rec("a", 0, 30, 5.0), rec("b", 0, 15, 50.0)], 30, 15) == (15, 30)
    # Rebalancing: move into a hole; never for a marginal gain.
    me = rec("me", 0, 15)
    assert better_span([rec("x", 0, 15), me], me, 30, 15) == (15, 30)
    assert better_span([rec("x", 0, 15, 10.0), rec("y", 15, 30, 12.0), me], me, 30, 15) is None
    fast, slow = rec("fast", 0, 30, 100.0), rec("slow", 0, 30, 1.0)
    assert [(h.record.peer_id, h.start, h.end) for h in find_route([slow, fast], 0, 30)] == [("fast", 0, 30)]
    chain = find_route([rec("a", 0, 10), rec("b", 10, 30), fast], 0, 30, banned={"fast"})
    assert [(h.record.peer_id, h.start, h.end) for h in chain] == [("a", 0, 10), ("b", 10, 30)]
    # Spans that do not line up: the chain switches peers where the next span begins.
    chain = find_route([rec("a", 0, 12), rec("b", 10, 22), rec("c", 20, 30)], 0, 30)
    assert chain[0].start == 0 and chain[-1].end == 30
    assert all(h.record.start <= h.start < h.end <= h.record.end for h in chain)
    assert all(x.end == y.start for x, y in itertools.pairwise(chain))
    with pytest.raises(NoRouteError, match="layers 3:5 have no live peer"):
        find_route([rec("a", 0, 3), rec("b", 5, 30)], 0, 30)
    # Ranges print as --layers takes them: START:END, END excluded.
    assert format_layers([3, 4, 5, 9, 11, 12]) == "3:6, 9, 11:13"
