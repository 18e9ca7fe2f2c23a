"""`make security`: attacks on a real swarm, with figures.

1. An outsider in a private swarm (no certificate): DHT records it stores that a member can read, and its
   inference and ledger calls that a member answers. Target: 0 and 0.
2. Ledger tampering of every kind on a 60-entry, 3-author copy: share detected by `verify`. Target: 100 %.
3. schemathesis against a real `swarmlm serve`'s /openapi.json (every phase, >= 1000 cases): responses
   with a 5xx status. Target: 0.
4. Fuzzing a real peer's P2P handlers (inference stream, ledger sync) with random bytes, wrong shapes,
   oversized tensors and bad headers: inputs refused, crashes, and whether it still serves a correct
   generation after. Target: every malformed input refused; the peer alive and serving.
5. A lying peer (its outputs carry 5 % noise) behind the right weights digest: the share of 16-token
   generations routed through it in which spot-checks catch it, per spot-check fraction f; false accusations
   of honest peers with every step checked. Target: caught about 1-(1-f)^16 of the time; 0 accusations.

    make security        # installs schemathesis, then runs every part (~7 min on 2 cores)
    .venv/bin/python bench/security_bench.py [--parts outsider,ledger,schemathesis,fuzz,liar] [--trials 50]
        [--examples 250] [--fractions 0.05,0.1,0.25,1.0] [--liar-trials 8]

Output: a table (stderr); a run of every part writes it into SECURITY.md (between its `figures`
markers); the last line of stdout is `BENCH_JSON {...}`; the same JSON goes to
bench/results/security-<time>.json. Past runs: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgpack
import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time
from rich.console import Console
from rich.table import Table

from swarmlm.core.dht import start_dht
from swarmlm.core.identity import Identity
from swarmlm.core.keys import members_key, model_key
from swarmlm.core.loop import LoopThread
from swarmlm.core.membership import Certificate, load_membership
from swarmlm.engine.sampling import SamplingParams
from swarmlm.launch.peers import PeerProcess
from swarmlm.launch.servers import ServerProcess
from swarmlm.ledger.chain import Entry, compare_copies
from swarmlm.ledger.store import Ledger, verify_file
from swarmlm.ledger.sync import LedgerServicer
from swarmlm.model.loading import DEFAULT_MODEL_ID
from swarmlm.swarm.client import ClientConfig, RemoteModel
from swarmlm.swarm.messages import RemoteError, StepRequest, read_response
from swarmlm.swarm.routing import NoRouteError
from swarmlm.swarm.servicer import SpanServicer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: import the sibling module
from bench_output import save_result

ROOT = Path(__file__).resolve().parent.parent
HIDDEN = 576  # SmolLM2-135M
console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)


# ---- 1. an outsider in a private swarm ---------------------------------------------------------------


async def _one(*items: runtime_pb2.ExpertRequest) -> AsyncIterator[runtime_pb2.ExpertRequest]:
    for item in items:
        yield item
        await asyncio.sleep(0)


def header(**overrides: Any) -> dict[str, Any]:
    fields = {"session_id": os.urandom(8).hex(), "model_id": DEFAULT_MODEL_ID, "start": 0, "end": 30, "max_length": 16}
    return fields | overrides


async def infer(p2p: P2P, peer: str, *requests: runtime_pb2.ExpertRequest) -> torch.Tensor:
    """One inference stream; the first reply (RemoteError if the peer refused)."""
    stub: Any = SpanServicer.get_stub(p2p, PeerID.from_base58(peer))
    stream = await stub.rpc_inference(_one(*requests))
    return read_response(await asyncio.wait_for(anext(stream), 60))


async def ledger_call(p2p: P2P, peer: str, metadata: bytes) -> Any:
    stub: Any = LedgerServicer.get_stub(p2p, PeerID.from_base58(peer))
    reply = await stub.rpc_ledger_since(runtime_pb2.ExpertRequest(metadata=metadata), timeout=30)
    return msgpack.unpackb(reply.metadata) if reply.metadata else []


def unauthorized(work: Path, trials: int) -> dict[str, Any]:
    owner = Identity.load_or_create(work / "owner.key")
    paths = {}
    for name in ("member", "reader"):
        ident = Identity.load_or_create(work / f"{name}.key")
        Certificate.issue(owner, ident.peer_id, 3600).save(work / f"{name}.cert")
        paths[name] = (work / f"{name}.key", work / f"{name}.cert")
    member = PeerProcess(
        "--layers", "0:30", "--identity", str(paths["member"][0]), "--swarm-cert", str(paths["member"][1])
    )
    outsider = reader = None
    loop = LoopThread("outsider")
    try:
        member.wait_ready()
        outsider = start_dht([member.maddr], ["/ip4/127.0.0.1/tcp/0"])
        keys = [model_key(DEFAULT_MODEL_ID), members_key(owner.peer_id), "swarmlm-train.all_averagers", "anything"]
        for i in range(trials):
            value = {"peer_id": f"outsider{i}", "start": 0, "end": 30}
            outsider.store(keys[i % len(keys)], value, get_dht_time() + 600, subkey=f"outsider{i}")
        reader_id = Identity.load(paths["reader"][0])
        cert = load_membership(paths["reader"][1], reader_id)
        reader = start_dht([member.maddr], ["/ip4/127.0.0.1/tcp/0"], reader_id, client=True, cert=cert)
        readable = 0
        for key in keys:
            found = reader.get(key, latest=True)
            values = found.value if found is not None and isinstance(found.value, dict) else {}
            readable += sum(1 for subkey in values if str(subkey).startswith("outsider"))
        p2p = loop.run(outsider.replicate_p2p(), 60)
        answered = 0
        for _ in range(trials):
            try:
                loop.run(
                    infer(p2p, member.peer_id, StepRequest.single(torch.zeros(1, HIDDEN), 0, header()).to_proto()), 90
                )
                answered += 1
            except Exception:  # refused: an error reply, or the stream closed on us
                pass
            reply = loop.run(ledger_call(p2p, member.peer_id, msgpack.packb({})), 60)
            answered += not (isinstance(reply, dict) and "error" in reply)
        return {"dht_stores": trials, "records_accepted": readable, "rpcs": 2 * trials, "rpcs_accepted": answered}
    finally:
        loop.stop()
        for dht in (outsider, reader):
            if dht is not None:
                dht.shutdown()
        member.stop()


# ---- 2. ledger tampering -----------------------------------------------------------------------------


def build_ledger(path: Path, n: int) -> list[Identity]:
    """n entries by three authors, each writing on top of everything it has seen (as peers do)."""
    authors = [Identity.generate() for _ in range(3)]
    kinds = ["join", "attestation", "training_round", "leave"]
    with Ledger(path, authors[0]) as main:
        for i in range(n):
            author = authors[i % 3]
            if author is authors[0]:
                main.append(kinds[i % 4], {"i": i, "digest": os.urandom(8).hex()})
                continue
            with Ledger(None, author) as theirs:
                theirs.merge(main.entries)
                entry = theirs.append(kinds[i % 4], {"i": i, "digest": os.urandom(8).hex()})
            main.merge([entry])
    return authors


def _modify_body(lines: list[str], rng: random.Random) -> list[str]:
    i = rng.randrange(len(lines))
    row = json.loads(lines[i])
    row["body"]["digest"] = os.urandom(8).hex()
    return [*lines[:i], json.dumps(row), *lines[i + 1 :]]


def _modify_signature(lines: list[str], rng: random.Random) -> list[str]:
    i = rng.randrange(len(lines))
    row = json.loads(lines[i])
    j = rng.randrange(len(row["sig"]))
    row["sig"] = row["sig"][:j] + format((int(row["sig"][j], 16) + 1) % 16, "x") + row["sig"][j + 1 :]
    return [*lines[:i], json.dumps(row), *lines[i + 1 :]]


def _reorder(lines: list[str], rng: random.Random) -> list[str]:
    i, j = sorted(rng.sample(range(len(lines)), 2))
    out = list(lines)
    out[i], out[j] = out[j], out[i]
    return out


def _insert_forged(lines: list[str], rng: random.Random) -> list[str]:
    """A new entry claiming to be by an existing author, signed by someone else."""
    i = rng.randrange(len(lines))
    claimed = dataclasses.replace(Entry.from_wire(json.loads(lines[i])), body={"forged": True})
    forged = dataclasses.replace(claimed, sig=Identity.generate().sign(claimed.signed_bytes()).hex())
    return [*lines[: i + 1], json.dumps(forged.to_wire()), *lines[i + 1 :]]


def _duplicate(lines: list[str], rng: random.Random) -> list[str]:
    i = rng.randrange(len(lines))
    at = rng.randrange(i + 1, len(lines) + 1)
    return [*lines[:at], lines[i], *lines[at:]]


def _delete(lines: list[str], rng: random.Random) -> list[str]:
    i = rng.randrange(len(lines) - 1)  # any but the newest: see `_drop_newest`
    return lines[:i] + lines[i + 1 :]


def _corrupt_bytes(lines: list[str], rng: random.Random) -> list[str]:
    i = rng.randrange(len(lines) - 1)  # a torn *last* line is a crash, recovered by design
    j = rng.randrange(len(lines[i]))
    return [*lines[:i], lines[i][:j] + chr(rng.randrange(33, 127)) + lines[i][j + 1 :], *lines[i + 1 :]]


TAMPERING: dict[str, Callable[[list[str], random.Random], list[str]]] = {
    "modified entry": _modify_body,
    "modified signature": _modify_signature,
    "reordered entries": _reorder,
    "inserted forged entry": _insert_forged,
    "inserted duplicate": _duplicate,
    "deleted entry": _delete,
    "corrupted bytes": _corrupt_bytes,
}


def tampering(work: Path, trials: int) -> dict[str, Any]:
    path = work / "ledger.jsonl"
    build_ledger(path, 60)
    lines = path.read_text().splitlines()
    assert verify_file(path).ok
    rng = random.Random(0)
    out: dict[str, Any] = {}
    for name, tamper in TAMPERING.items():
        detected = 0
        for _ in range(trials):
            changed = tamper(lines, rng)
            if changed == lines:  # e.g. a byte replaced by itself: not tampering
                detected += 1
                continue
            bad = work / "tampered.jsonl"
            bad.write_text("\n".join(changed) + "\n")
            detected += not verify_file(bad).ok
        out[name] = {"trials": trials, "detected": detected}
    # Dropping the newest entries leaves a valid prefix: only another copy's heads reveal it.
    dropped = work / "dropped.jsonl"
    dropped.write_text("\n".join(lines[:-1]) + "\n")
    with Ledger(dropped) as short, Ledger(path) as full:
        behind = bool(compare_copies(short.entries, full.entries)[0])  # what `ledger verify --against` does
    out["dropped newest entry"] = {
        "trials": 1,
        "detected": int(not verify_file(dropped).ok),
        "seen_against_a_copy": behind,
    }
    return out


# ---- 3. schemathesis ---------------------------------------------------------------------------------


def schemathesis(work: Path, examples: int) -> dict[str, Any]:
    server = ServerProcess("--max-model-len", "64", "--max-batch-seqs", "8")
    report = work / "schemathesis.json"
    try:
        server.wait_ready()
        cmd = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{server.base}/openapi.json"]
        cmd += ["--checks", "not_a_server_error", "--max-examples", str(examples), "--seed", "1", "--no-shrink"]
        cmd += ["--report", "json", "--report-json-path", str(report), "--generation-database", "none"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if not report.exists():
            raise RuntimeError(f"schemathesis wrote no report:\n{(done.stdout + done.stderr)[-3000:]}")
        data = json.loads(report.read_text())
        cases = data["test_cases"]
        return {
            "exit": done.returncode,
            "operations": data["operations"]["tested"],
            "cases": cases["generated"],
            "server_errors": cases["with_failures"],
            "errored": cases["errored"],
            "failures": [f"{f['title']} x{f['count']}" for f in data["failures"]],
            "server_alive": server.proc.poll() is None,
        }
    finally:
        server.stop()


# ---- 4. fuzzing a peer's P2P handlers ----------------------------------------------------------------


def fuzz_cases(rng: random.Random) -> list[tuple[str, list[runtime_pb2.ExpertRequest]]]:
    def step(hidden: torch.Tensor, position: int = 0, **h: Any) -> runtime_pb2.ExpertRequest:
        return StepRequest.single(hidden, position, header(**h)).to_proto()

    cases: list[tuple[str, list[runtime_pb2.ExpertRequest]]] = []
    for _ in range(100):
        raw = runtime_pb2.ExpertRequest(metadata=os.urandom(rng.randrange(1, 200)))
        raw.tensors.append(runtime_pb2.Tensor(buffer=os.urandom(rng.randrange(0, 4000)), size=[rng.randrange(0, 99)]))
        cases.append(("random bytes", [raw]))
    for _ in range(20):
        broken = serialize_torch_tensor(torch.randn(2, HIDDEN))
        broken.buffer = broken.buffer[: rng.randrange(len(broken.buffer))]
        request = runtime_pb2.ExpertRequest(
            tensors=[broken], metadata=msgpack.packb({"step": 0, "rows": [["0", 0, 2, 16]], "header": header()})
        )
        cases.append(("truncated tensor", [request]))
    shapes = [(1, 100), (HIDDEN,), (1, 1, HIDDEN), (0, HIDDEN), (3, HIDDEN + 1)]
    cases += [("wrong shape", [step(torch.randn(*s))]) for s in shapes]
    cases.append(("oversized tensor", [step(torch.randn(8192, HIDDEN), max_length=16)]))
    cases.append(("oversized session", [step(torch.randn(1, HIDDEN), max_length=10**12)]))
    cases.append(("NaN input", [step(torch.full((2, HIDDEN), float("nan")))]))
    cases.append(("wrong dtype", [step(torch.randint(0, 9, (2, HIDDEN)))]))
    bad_headers = [
        {"model_id": "no-such-model"},
        {"start": 20, "end": 10},
        {"start": -1},
        {"end": 99},
        {"start": "0"},
        {"session_id": None},
        {"max_length": -5},
    ]
    cases += [("bad header", [step(torch.randn(1, HIDDEN), **h)]) for h in bad_headers]
    no_header = runtime_pb2.ExpertRequest(
        tensors=[serialize_torch_tensor(torch.randn(1, HIDDEN))],
        metadata=msgpack.packb({"step": 0, "rows": [["0", 0, 1, 16]]}),
    )
    cases.append(("no header", [no_header]))
    cases.append(("position ahead", [step(torch.randn(1, HIDDEN), position=5)]))
    cases.append(("negative position", [step(torch.randn(1, HIDDEN), position=-3)]))
    return cases


def fuzz(work: Path) -> dict[str, Any]:
    peer = PeerProcess("--layers", "0:30")
    outsider = None
    loop = LoopThread("fuzzer")
    rng = random.Random(0)
    try:
        peer.wait_ready()
        outsider = start_dht([peer.maddr], ["/ip4/127.0.0.1/tcp/0"], client=True)
        p2p = loop.run(outsider.replicate_p2p(), 60)
        cases = fuzz_cases(rng)
        refused = other = 0
        for _name, requests in cases:
            try:
                loop.run(infer(p2p, peer.peer_id, *requests), 120)
                other += 1  # answered with a tensor: only fine for inputs that are valid after all
            except RemoteError:
                refused += 1
            except Exception:  # the stream broke: counted, the peer must still be alive
                other += 1
        ledger_cases = [os.urandom(rng.randrange(0, 300)) for _ in range(50)]
        ledger_cases += [msgpack.packb({"x": 2**63}), msgpack.packb([1, 2]), msgpack.packb({"a" * 10**5: 1})]
        ledger_refused = 0
        for metadata in ledger_cases:
            reply = loop.run(ledger_call(p2p, peer.peer_id, metadata), 60)
            ledger_refused += isinstance(reply, dict) and "error" in reply
        alive = peer.proc.poll() is None
        with RemoteModel(initial_peers=[peer.maddr]) as client:
            ids = client.tokenizer.encode("The capital of France is")
            served = len(client.generate(ids, SamplingParams(max_tokens=4, temperature=0))) == 4
        return {
            "inference_cases": len(cases),
            "inference_refused": refused,
            "inference_other": other,
            "ledger_cases": len(ledger_cases),
            "ledger_refused": ledger_refused,
            "peer_alive": alive,
            "served_after": served,
        }
    finally:
        loop.stop()
        if outsider is not None:
            outsider.shutdown()
        peer.stop()


# ---- 5. a lying peer --------------------------------------------------------------------------------


def lying_peer(fractions: list[float], trials: int, tokens: int = 16) -> dict[str, Any]:
    peers: dict[str, PeerProcess] = {}
    dht = None
    try:
        peers["honest1"] = PeerProcess("--layers", "0:30").wait_ready()
        boot = peers["honest1"].maddr
        peers["liar"] = PeerProcess("--layers", "0:30", "--perturb-outputs", "0.05", initial=boot).wait_ready()
        peers["honest2"] = PeerProcess("--layers", "0:30", initial=boot).wait_ready()
        dht = start_dht([boot], ["/ip4/127.0.0.1/tcp/0"], client=True)
        params = SamplingParams(max_tokens=tokens, temperature=0)

        def generation(fraction: float, through: str) -> tuple[int, int, float]:
            """(accusations of honest peers, or of the liar when routed through it; spot-checks; seconds
            the generation took) of one generation routed through `through` only, by a fresh client.
            (Routed through an honest peer, the liar may be picked as a checker and rightly accused: that
            is not counted.)"""
            config = ClientConfig(spot_check=fraction, allowed_peers=(peers[through].peer_id,), route_timeout=3)
            with RemoteModel(dht=dht, config=config) as client:
                while len(client.routable_records()) < 3:
                    time.sleep(0.5)
                t0 = time.perf_counter()
                with contextlib.suppress(NoRouteError):  # the liar, caught and banned, was the only way
                    client.generate(client.tokenizer.encode("The capital of France is"), params)
                seconds = time.perf_counter() - t0
                accused = [p for p in ("honest1", "honest2", "liar") if peers[p].peer_id in client.banned_peers()]
                wrong = [p for p in accused if p != "liar"] if through != "liar" else accused
                return len(wrong), client.stats.spot_checks, seconds

        rates = {}
        for fraction in fractions:
            runs = [generation(fraction, "liar") for _ in range(trials)]
            rates[str(fraction)] = {
                "trials": trials,
                "caught": sum(accused > 0 for accused, _, _ in runs),
                "expected": 1 - (1 - fraction) ** tokens,
                "seconds_per_generation": statistics.median(s for _, _, s in runs),
            }
        false = [generation(1.0, name) for name in ("honest1", "honest2") for _ in range(max(1, trials // 4))]
        return {
            "tokens": tokens,
            "noise": 0.05,
            "detection": rates,
            "honest_generations": len(false),
            "honest_spot_checks": sum(c for _, c, _ in false),
            "false_accusations": sum(a for a, _, _ in false),
        }
    finally:
        if dht is not None:
            dht.shutdown()
        for p in peers.values():
            p.stop()


# ---- report ------------------------------------------------------------------------------------------


def write_security_md(table_md: str) -> None:
    path = ROOT / "SECURITY.md"
    text = path.read_text()
    start, end = "<!-- figures:start -->", "<!-- figures:end -->"
    if start in text and end in text:
        text = text[: text.index(start) + len(start)] + "\n" + table_md + "\n" + text[text.index(end) :]
        path.write_text(text)


PARTS = ("outsider", "ledger", "schemathesis", "fuzz", "liar")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=50, help="tampering trials per kind; outsider attempts")
    parser.add_argument("--examples", type=int, default=250, help="schemathesis examples per operation")
    parser.add_argument("--parts", default=",".join(PARTS), help="a subset leaves SECURITY.md as it is")
    parser.add_argument("--fractions", default="0.05,0.1,0.25,1.0", help="spot-check fractions for the liar")
    parser.add_argument("--liar-trials", type=int, default=8, help="generations through the liar per fraction")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if unknown := parts - set(PARTS):
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    result: dict[str, Any] = {"trials": args.trials}
    with tempfile.TemporaryDirectory(prefix="swarmlm-security-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("SWARMLM_HOME", str(work / "home"))
        t0 = time.perf_counter()
        if "outsider" in parts:
            result["outsider"] = unauthorized(work, args.trials)
        if "ledger" in parts:
            result["ledger"] = tampering(work, args.trials)
        if "schemathesis" in parts:
            result["schemathesis"] = schemathesis(work, args.examples)
        if "fuzz" in parts:
            result["fuzz"] = fuzz(work)
        if "liar" in parts:
            fractions = [float(f) for f in args.fractions.split(",")]
            result["lying_peer"] = lying_peer(fractions, args.liar_trials)
        result["seconds"] = round(time.perf_counter() - t0, 1)

    rows: list[tuple[str, str, str]] = []
    if o := result.get("outsider"):
        rows.append(("outsider: DHT records accepted", f"{o['records_accepted']} of {o['dht_stores']}", "0"))
        rows.append(("outsider: RPCs answered", f"{o['rpcs_accepted']} of {o['rpcs']}", "0"))
    if led := result.get("ledger"):
        for name, r in led.items():
            if name == "dropped newest entry":
                seen = "seen by verify --against another copy" if r["seen_against_a_copy"] else "not seen"
                rows.append((f"ledger: {name}", f"verify: {r['detected']}/1; {seen}", "(see SECURITY.md)"))
            else:
                rows.append((f"ledger: {name}", f"{r['detected']}/{r['trials']} detected", "100 %"))
    if s := result.get("schemathesis"):
        got = f"{s['cases']} cases on {s['operations']} operations, {s['server_errors']} with a 5xx"
        rows.append(("schemathesis on /openapi.json", got, ">= 1000 cases, 0 with a 5xx"))
    if f := result.get("fuzz"):
        rest = f["inference_cases"] - f["inference_refused"]
        why = f"the other {rest}: the stream closed on the sender, or an input that was valid after all"
        rows.append(("fuzz: inference refused", f"{f['inference_refused']} of {f['inference_cases']} ({why})", "all"))
        rest = f["ledger_cases"] - f["ledger_refused"]
        why = f"the other {rest} decode to valid requests, e.g. empty heads"
        rows.append(("fuzz: ledger refused", f"{f['ledger_refused']} of {f['ledger_cases']} ({why})", "all"))
        rows.append(("fuzz: peer alive, serves after", f"{f['peer_alive']}, {f['served_after']}", "True, True"))
    if lp := result.get("lying_peer"):
        for fraction, r in lp["detection"].items():
            label = f"liar caught in a {lp['tokens']}-token generation, spot-check {fraction}"
            got = f"{r['caught']}/{r['trials']} ({r['seconds_per_generation']:.1f} s per generation)"
            rows.append((label, got, f"~{r['expected']:.0%} (1-(1-f)^{lp['tokens']})"))
        honest = f"{lp['false_accusations']} in {lp['honest_spot_checks']} checks"
        rows.append(("honest peers falsely accused", honest, "0"))

    table = Table(title="Security (real peers on loopback, real server, SmolLM2-135M)")
    for col in ("attack", "result", "target"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    md = "| attack | result | target |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    if parts == set(PARTS):  # a partial run would drop the other parts' figures from the page
        stamp = time.strftime("%Y-%m-%d")
        write_security_md(f"Measured {stamp} with `make security` ({result['seconds']:.0f} s):\n\n{md}")
    else:
        console.print("a partial run: SECURITY.md's figures are left as they are")
    save_result("security", result)


if __name__ == "__main__":
    main()
