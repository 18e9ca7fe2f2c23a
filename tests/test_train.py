"""Training with real `swarmlm train` processes on loopback: DiLoCo, the data-parallel baseline, eval and
export, attacks, privacy and the dashboard's loss curve. Peers that join, crash, come late or start apart,
and LoRA: test_train_elastic.py."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from swarmlm.launch.peers import PeerProcess, free_port, stop_all
from swarmlm.launch.servers import ServerProcess
from swarmlm.launch.trainers import TrainerProcess
from swarmlm.ledger.chain import Entry
from swarmlm.ledger.store import read_lines, verify_file
from tests.lm_eval_tasks import write_tasks
from tests.training_runs import averaged, finish, start_trainers, wait_for

pytestmark = pytest.mark.slow


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


def test_eval_scores_a_run_with_lm_eval_tasks(three_peers: list[TrainerProcess], tmp_path: Path) -> None:
    """`swarmlm eval RUN --tasks`: lm-evaluation-harness scores the run's best round on tasks of one's own
    (the model learned 4 plays in 5 rounds: the scores are numbers, not knowledge)."""
    write_tasks(tmp_path)
    run = three_peers[0].run_dir

    def swarmlm_eval(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "swarmlm.cli", "eval", str(run), *args]
        return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})

    out = swarmlm_eval("--tasks", "swarmlm_choice,swarmlm_perplexity", "--include-path", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    scores = dict(re.findall(r"^  (\S+ \S+)=([0-9.]+)", out.stdout, re.MULTILINE))
    assert 0 <= float(scores["swarmlm_choice acc"]) <= 1 and float(scores["swarmlm_perplexity word_perplexity"]) > 1
    for args, words in [
        (("--tasks", "no_such_task", "--include-path", str(tmp_path)), "unknown lm-eval task 'no_such_task'"),
        ((), "give --data"),
    ]:
        out = swarmlm_eval(*args)
        errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
        assert out.returncode == 2 and "Traceback" not in out.stderr and len(errors) == 1, out.stderr
        assert words in errors[0]


def test_one_byzantine_peer(data: Path, tmp_path: Path) -> None:
    """Peer 2 of 3 sends -10x its update. A robust rule keeps training; the plain mean is wrecked. The two
    runs (one per rule, each its own swarm) train at once: their peers mostly wait on one another. Both
    robust rules go through the same reducers (train/allreduce.py); trimmed_mean against the same
    attacks: tests/test_train_parts.py."""
    runs: dict[str, list[TrainerProcess]] = {}
    try:
        for rule in ("mean", "centered_clip"):
            runs[rule] = start_trainers(
                data,
                tmp_path / rule,
                3,
                rounds=3,
                extra=("--aggregation", rule),
                per_peer={2: ("--byzantine", "sign_flip")},
            )
        for peers in runs.values():
            finish(peers)
    finally:
        stop_all([p for peers in runs.values() for p in peers])
    for rule, peers in runs.items():
        val = [x["val_loss"] for x in averaged(peers[0])]
        if rule == "mean":
            assert val[-1] > val[0], val
        else:
            assert val[-1] < val[0] < math.log(512), (rule, val)


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
