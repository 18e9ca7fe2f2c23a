"""Training with real `swarmlm train` processes on loopback: DiLoCo, elastic peers, attacks, privacy, and
`swarmlm train` as a person runs it (default flags, peers started by hand a few seconds apart)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from swarmlm.launch.peers import PeerProcess, free_port
from swarmlm.launch.servers import ServerProcess
from swarmlm.launch.trainers import TrainerProcess, start_run
from swarmlm.ledger.chain import Entry
from swarmlm.ledger.store import read_lines, verify_file
from swarmlm.train.data import default_corpus_files, prepare

pytestmark = pytest.mark.slow

FAST = ("--inner-steps", "10", "--batch-size", "8", "--matchmaking-time", "1.5", "--inner-lr", "3e-3")
SHORT = ("--inner-steps", "10")  # the defaults but for the run's length: a tiny model, 10 steps a round


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four plays, a 512-token BPE trained on them, 64-token blocks."""
    out = tmp_path_factory.mktemp("data")
    prepare(default_corpus_files()[:4], out, train_tokenizer=512, block_size=64)
    return out


def start_trainers(
    data: Path,
    root: Path,
    n: int,
    rounds: int,
    extra: tuple[str, ...] = (),
    per_peer: dict[int, tuple[str, ...]] | None = None,
) -> list[TrainerProcess]:
    """n peers of one run. Rounds wait for all n (--min-group-size n) unless `extra` says otherwise, so
    every averaged round has the same group."""
    args = ("--rounds", str(rounds), *FAST, "--target-group-size", str(n), "--min-group-size", str(n), *extra)
    return start_run(data, root, n, args, per_peer)


def averaged(peer: TrainerProcess) -> list[dict]:
    return [r for r in peer.rounds() if r["averaged"]]


def most_averaged(peers: list[TrainerProcess]) -> TrainerProcess:
    return max(peers, key=lambda p: len(averaged(p)))


def assert_rounds_in_every_ledger(peers: list[TrainerProcess], mode: str) -> None:
    """Every averaged round is in every peer's copy, signed by members of its group, with the weights
    the peers reported."""
    reports = averaged(most_averaged(peers))
    ids = {p.peer_id for p in peers}
    for peer in peers:
        copy = peer.run_dir / "ledger.jsonl"
        assert verify_file(copy).ok
        entries = [e for e in read_lines(copy)[0] if isinstance(e, Entry) and e.kind == "training_round"]
        assert {(e.body["round"], e.body["weights"], e.body["mode"]) for e in entries} == {
            (x["round"], x["digest"], mode) for x in reports
        }
        assert all(set(e.body["participants"]) == ids and e.author in ids for e in entries)
        assert all(bool(e.body["update"]) == (mode == "diloco") for e in entries)


def finish(peers: list[TrainerProcess], timeout: float = 300) -> None:
    try:
        for p in peers:
            assert p.finish(timeout) == 0, p.log.read_text()[-3000:]
    finally:
        for p in peers:
            p.stop()


@pytest.fixture(scope="module")
def three_peers(data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[TrainerProcess]:
    peers = start_trainers(data, tmp_path_factory.mktemp("run"), 3, rounds=5)
    finish(peers)
    return peers


def assert_same_weights_every_round(peers: list[TrainerProcess], rounds: int) -> list[dict]:
    """Every round is averaged by the whole group; a peer whose side of one all-reduce broke (peers start a
    few seconds apart on a loaded machine) takes that round's result from the others instead, so after
    every round all peers hold the same weights either way. Returns the reports of a peer that averaged
    every round."""
    reports = [[x for x in p.rounds() if x["round"] > 0] for p in peers]
    for r in reports:
        assert [x["round"] for x in r] == list(range(1, rounds + 1))
        assert sum(x["averaged"] for x in r) >= rounds - 1
        assert all(x["group_size"] == len(peers) for x in r if x["averaged"])
    for i in range(rounds):
        assert len({r[i]["digest"] for r in reports}) == 1
    reference = averaged(most_averaged(peers))
    assert len(reference) == rounds
    return reference


def test_diloco_loss_falls_and_every_peer_holds_the_same_weights(three_peers: list[TrainerProcess]) -> None:
    reference = assert_same_weights_every_round(three_peers, 5)
    val = [x["val_loss"] for x in reference]
    assert val[-1] < val[0] < math.log(512)
    assert all(x["bytes_sent"] > 0 for x in reference)
    assert_rounds_in_every_ledger(three_peers, "diloco")


def test_synchronous_data_parallel_baseline(data: Path, tmp_path: Path) -> None:
    """`--mode ddp`: gradients averaged every step; every peer holds the same weights after each round."""
    peers = start_trainers(data, tmp_path, 2, rounds=2, extra=("--mode", "ddp", "--inner-steps", "5"))
    finish(peers)
    reference = assert_same_weights_every_round(peers, 2)
    assert reference[-1]["val_loss"] < peers[0].rounds()[0]["val_loss"]
    assert_rounds_in_every_ledger(peers, "ddp")


def test_eval_export_and_serve_the_trained_model(three_peers: list[TrainerProcess], data: Path, tmp_path: Path):
    run = three_peers[0].run_dir
    out = subprocess.run(
        [sys.executable, "-m", "swarmlm.cli", "eval", str(run), "--data", str(data)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "val_loss=" in out.stdout and "perplexity=" in out.stdout
    export = tmp_path / "exported"
    out = subprocess.run([sys.executable, "-m", "swarmlm.cli", "export", str(run), "--out", str(export)], text=True)
    assert out.returncode == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in export.iterdir()}
    # The reference: transformers reads the export on its own and continues the prompt greedily. (A
    # barely trained model may well continue with newlines only: what matters is that it is this model.)
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(export / "tokenizer.json"))
    prompt = tokenizer.encode("ROMEO:")
    reference = LlamaForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(reference(torch.tensor([ids])).logits[0, -1].argmax()))
    server = ServerProcess("--model", str(export))
    try:
        server.wait_ready()
        request = {"model": "exported", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{server.base}/v1/completions", json=request, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 12
        assert r.json()["choices"][0]["text"] == tokenizer.decode(ids[len(prompt) :])
    finally:
        server.stop()


def test_join_crash_resume_and_a_corrupt_checkpoint(data: Path, tmp_path: Path) -> None:
    """Two peers train; a third joins mid-run (downloads the state); one crashes (kill -9) and restarts
    from its checkpoints, the newest of which was corrupted meanwhile: it resumes from the one before
    and catches up. All end with the same weights."""
    rounds = 20  # enough that the others are still training when the crashed peer is back
    peers = start_trainers(
        data, tmp_path, 2, rounds=rounds, extra=("--target-group-size", "3", "--min-group-size", "2")
    )
    try:
        wait_for(lambda: len(averaged(peers[1])) >= 2)
        args = ("--data", str(data), "--data-part", "2/3", "--rounds", str(rounds), *FAST, "--min-group-size", "2")
        joiner = TrainerProcess(*args, "--target-group-size", "3", run_dir=tmp_path / "joiner", initial=peers[0].maddr)
        peers.append(joiner.wait_ready())
        wait_for(lambda: len(averaged(joiner)) >= 1)
        assert "caught up: downloaded round" in joiner.log.read_text()
        wait_for(lambda: len(averaged(peers[1])) >= 6)
        peers[1].crash()
        checkpoints = sorted((peers[1].run_dir / "checkpoints").glob("round-*.safetensors"))
        newest = checkpoints[-1]
        newest.write_bytes(newest.read_bytes()[:-10] + b"corrupted!")
        restarted = peers[1].restart(initial=peers[0].maddr)
        peers[1] = restarted.wait_ready(timeout=120)
        finish(peers)
    finally:
        for p in peers:
            p.stop()
    log = restarted.log.read_text()
    assert f"skipping corrupt checkpoint: {newest}: checksum mismatch" in log
    assert f"resumed from {restarted.run_dir / 'checkpoints'} at round {int(checkpoints[-2].stem[-6:])}" in log
    assert "caught up: downloaded round" in log
    # The round each peer ends holding is its newest checkpoint: a peer that was still behind when the
    # others finished (on a loaded machine, the restarted one) takes the last rounds by download, which
    # writes a checkpoint but no round report of its own.
    assert {p.checkpointed_round() for p in peers} == {rounds}
    final = [json.loads((p.run_dir / "checkpoints" / f"round-{rounds:06d}.json").read_text()) for p in peers]
    assert len({f["digest"] for f in final}) == 1


def wait_for(cond, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


@pytest.mark.parametrize("rule", ["mean", "trimmed_mean", "centered_clip"])
def test_one_byzantine_peer(data: Path, tmp_path: Path, rule: str) -> None:
    """Peer 2 of 3 sends -10x its update. Robust rules keep training; the plain mean is wrecked."""
    peers = start_trainers(
        data, tmp_path, 3, rounds=5, extra=("--aggregation", rule), per_peer={2: ("--byzantine", "sign_flip")}
    )
    finish(peers)
    val = [x["val_loss"] for x in averaged(peers[0])]
    if rule == "mean":
        assert val[-1] > val[0]
    else:
        assert val[-1] < val[0] < math.log(512)


def test_differential_privacy_reports_epsilon(data: Path, tmp_path: Path) -> None:
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "swarmlm.cli",
            "train",
            "--data",
            str(data),
            "--run-dir",
            str(tmp_path / "x"),
            "--dp-noise",
            "1.0",
        ],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and "--dp-delta" in refused.stderr and "Traceback" not in refused.stderr
    peers = start_trainers(
        data, tmp_path, 2, rounds=3, extra=("--dp-noise", "0.5", "--dp-clip", "0.5", "--dp-delta", "1e-5")
    )
    finish(peers)
    eps = [x["epsilon"] for x in averaged(peers[0])]
    assert all(e is not None and 0 < e < math.inf for e in eps)
    assert eps == sorted(eps) and eps[0] < eps[-1]
    assert "epsilon=" in peers[0].log.read_text()


def test_the_dashboard_shows_a_training_runs_loss_curve(data: Path, tmp_path: Path) -> None:
    metrics_port = free_port()
    trainer = TrainerProcess(
        "--data",
        str(data),
        "--rounds",
        "100",
        "--inner-steps",
        "5",
        "--run-id",
        "curve-run",
        "--metrics-port",
        str(metrics_port),
        "--min-peers",
        "1",
        run_dir=tmp_path / "t",
    )
    gateway = None
    try:
        trainer.wait_ready()
        port = free_port()
        gateway = PeerProcess("--layers", "none", "--api", f"127.0.0.1:{port}", initial=trainer.maddr, threads=None)
        gateway.wait_ready()
        runs: list[dict] = []

        def curve_shown() -> bool:
            nonlocal runs
            runs = httpx.get(f"http://127.0.0.1:{port}/dashboard/state", timeout=10).json()["training"]
            return bool(runs) and len(runs[0]["curve"]) >= 3

        wait_for(curve_shown)
        (run,) = runs
        assert run["run_id"] == "curve-run" and run["round"] >= 2
        reported = {r["round"]: round(r["val_loss"], 4) for r in trainer.rounds() if not math.isnan(r["val_loss"])}
        assert all(reported[r] == loss for r, loss in run["curve"])  # the curve is the peer's validation loss
        assert 'id="training"' in httpx.get(f"http://127.0.0.1:{port}/dashboard", timeout=10).text
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        assert "swarmlm:train_round" in metrics and "swarmlm:train_val_loss" in metrics
    finally:
        if gateway is not None:
            gateway.stop()
        trainer.stop()


def test_lora_fine_tune_of_the_embedded_model(tmp_path: Path) -> None:
    """Two peers fine-tune SmolLM2 with LoRA: only the adapters travel, both end with the same adapters,
    and the export folds them into a plain checkpoint that the serving stack loads."""
    from swarmlm.model.loading import default_model_path, load_model

    data = tmp_path / "data"
    prepare(default_corpus_files()[:1], data, block_size=32)  # the embedded model's own tokenizer
    extra = ("--model", "SmolLM2-135M-Instruct", "--lora-rank", "4", "--inner-steps", "3", "--batch-size", "2")
    extra += ("--warmup-steps", "1", "--inner-lr", "1e-3", "--matchmaking-time", "2")
    peers = start_trainers(data, tmp_path / "run", 2, rounds=2, extra=extra)
    finish(peers)
    reports = [averaged(p) for p in peers]
    assert [r["round"] for r in reports[0]] == [1, 2]
    assert reports[0][-1]["digest"] == reports[1][-1]["digest"]
    # rank-4 adapters on 30 layers: about 1.6 M values, where the whole model has 135 M
    assert 0 < reports[0][-1]["bytes_sent"] < 20e6
    export = tmp_path / "exported"
    out = subprocess.run([sys.executable, "-m", "swarmlm.cli", "export", str(peers[0].run_dir), "--out", str(export)])
    assert out.returncode == 0
    tuned, base = load_model(str(export)).span.state_dict(), load_model(str(default_model_path())).span.state_dict()
    assert tuned.keys() == base.keys()  # adapters folded in: no LoRA tensors left
    changed = {name for name in base if not torch.equal(tuned[name], base[name])}
    assert changed and all(name.endswith("proj.weight") for name in changed)  # only adapted layers moved


def assert_ends_well(peer: TrainerProcess, data: Path, rounds: int) -> None:
    """A checkpoint of the final round that `swarmlm eval` reads, a summary naming it, a clean output."""
    assert peer.checkpointed_round() == rounds
    out = subprocess.run(
        [sys.executable, "-m", "swarmlm.cli", "eval", str(peer.run_dir), "--data", str(data)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "val_loss=" in out.stdout
    log = peer.log.read_text()
    checkpoint = peer.run_dir / "checkpoints" / f"round-{rounds:06d}.json"
    assert f"swarmlm train: done: round {rounds}/{rounds} (" in log and f"checkpoint {checkpoint}" in log
    assert "Traceback" not in log
    assert (peer.run_dir / "hivemind.log").exists()


def test_two_peers_started_apart_train_together(data: Path, tmp_path: Path) -> None:
    """The first peer waits at round 1 for a second (--min-peers 2 by default): the two average from
    round 1, where the first used to train every round alone before the second was up."""
    args = ("--data", str(data), "--rounds", "2", *SHORT)
    first = TrainerProcess(*args, run_dir=tmp_path / "first").wait_ready()
    peers = [first]
    try:
        time.sleep(5)  # a person starting the second peer by hand
        peers.append(TrainerProcess(*args, run_dir=tmp_path / "second", initial=first.maddr).wait_ready())
    finally:
        finish(peers)
    for peer in peers:
        assert_ends_well(peer, data, 2)
        assert averaged(peer) and all(r["group_size"] == 2 for r in averaged(peer))
    assert "waiting up to 60 s for 2 peers" in first.log.read_text()


def test_a_late_joiner_keeps_the_round_it_downloaded(data: Path, tmp_path: Path) -> None:
    """A peer that arrives after the run's last round takes it by download, and writes it as its own
    checkpoint: its run folder is not left empty."""
    args = ("--data", str(data), "--rounds", "1", *SHORT)
    # --matchmaking-time 5: the first peer lingers 22 s after its last round, while the late one starts.
    first = TrainerProcess(*args, "--min-peers", "1", "--matchmaking-time", "5", run_dir=tmp_path / "first")
    peers = [first.wait_ready()]
    try:
        wait_for(lambda: first.checkpointed_round() >= 1)
        peers.append(TrainerProcess(*args, run_dir=tmp_path / "late", initial=first.maddr).wait_ready())
    finally:
        finish(peers)
    late = peers[1]
    assert "caught up: downloaded round 1" in late.log.read_text()
    assert late.rounds() == []  # it trained nothing itself
    assert_ends_well(late, data, 1)
    assert_ends_well(first, data, 1)
    records = [json.loads((p.run_dir / "checkpoints" / "round-000001.json").read_text()) for p in peers]
    assert records[0]["digest"] == records[1]["digest"]
