"""`swarmlm demo train`: a swarm trains a tiny model from scratch, survives a crash, then serves it.

1. The embedded corpus (public-domain plays) is cleaned, a 2048-token BPE is trained on it, and it is
   packed into blocks; each of three peers trains on its own third (the data never leaves a peer).
2. Three `swarmlm train` processes run DiLoCo rounds. Midway one is killed with SIGKILL and started
   again: it resumes from its last checkpoint and downloads the rounds it missed from the others.
3. The validation loss per round is printed, the best round is exported as an HF directory, and a local
   swarm (two `swarmlm peer` processes splitting its layers, and a gateway) answers a prompt with it.
"""

from __future__ import annotations

import math
import re
import signal
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from swarmlm.launch.peers import PeerProcess, start_swarm, stop_all
from swarmlm.launch.trainers import TrainerProcess, start_run

console = Console(soft_wrap=True)
PEERS = 3


def run_train_demo(work: Path, rounds: int, inner_steps: int, port: int, prompt: str) -> int:
    from openai import OpenAI

    from swarmlm.train.data import default_corpus_files, prepare
    from swarmlm.train.evaluation import export_checkpoint

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    work.mkdir(parents=True, exist_ok=True)
    procs: list[PeerProcess] = []
    try:
        console.print(f"[bold]swarmlm demo train[/]: preparing the embedded corpus in {work / 'data'} …")
        m = prepare(default_corpus_files(), work / "data", train_tokenizer=2048, block_size=128)
        console.print(f"  {m.stats.tokens:,} tokens, {m.stats.train_blocks:,} training blocks of 128")
        args = ("--rounds", str(rounds), "--inner-steps", str(inner_steps), "--inner-lr", "3e-3")
        args += ("--target-group-size", str(PEERS), "--min-group-size", "2", "--run-id", _run_id(work))
        args += ("--linger", "2")  # nobody joins the demo's run late; a peer behind is waited for all the same
        trainers = start_run(work / "data", work, PEERS, args)
        procs.extend(trainers)
        console.print(f"{PEERS} peers training a tiny model, {rounds} DiLoCo rounds of {inner_steps} steps …")
        victim = trainers[-1]
        _wait(lambda: victim.checkpointed_round() >= rounds // 3, trainers)  # so that it has one to resume from
        victim.crash()
        console.print(
            f"[red]killed[/] peer {PEERS - 1} (kill -9) after round {victim.checkpointed_round()}; restarting it …"
        )
        restarted = victim.restart(initial=trainers[0].maddr)
        procs[procs.index(victim)] = trainers[-1] = restarted
        restarted.wait_ready()
        for t in trainers:
            if t.finish(timeout=3600) != 0:
                raise RuntimeError(f"a training peer failed; its log: {t.log}")
        log = restarted.log.read_text()
        for line in log.splitlines():
            if "resumed from" in line or "caught up" in line:
                console.print(f"  restarted peer: {line.split(': ', 1)[-1]}")
        console.print(_loss_table(trainers))
        export = work / "model"
        export_checkpoint(work / "peer0", export)
        console.print(f"serving {export} on a local swarm (2 peers splitting its layers, and a gateway) …")
        procs += start_swarm(["0:2", "2:4"], extra=("--model", str(export)))
        gateway = PeerProcess(
            "--model", str(export), "--layers", "none", "--api", f"127.0.0.1:{port}", initial=procs[-1].maddr
        )
        procs.append(gateway)
        gateway.wait_ready()
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="demo")
        answer = client.completions.create(model="model", prompt=prompt, max_tokens=48, temperature=0.7, seed=0)
        console.print(f"[bold]prompt:[/] {prompt}\n[bold]the swarm's model:[/] {answer.choices[0].text}")
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        stop_all(procs)
        console.print("stopped.")


def _run_id(work: Path) -> str:
    """One run per work folder, so two demos on one machine do not train together."""
    return "demo-" + re.sub(r"[^\w-]", "-", work.resolve().name)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _wait(done: object, peers: list[TrainerProcess], timeout: float = 1800) -> None:
    deadline = time.monotonic() + timeout
    while not done():  # type: ignore[operator]
        for p in peers:
            if p.proc.poll() is not None:
                raise RuntimeError(f"a training peer exited early ({p.proc.returncode}):\n{p.log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError("training made no progress")
        time.sleep(0.5)


def _loss_table(trainers: list[TrainerProcess]) -> Table:
    """Validation loss per round, with a bar for the curve; "same weights": every peer's digest agrees."""
    reports = {r["round"]: r for r in trainers[0].rounds() if r["averaged"] or r["round"] == 0}
    top = max(r["val_loss"] for r in reports.values())
    table = Table(title="validation loss per round")
    for col in ("round", "val loss", "ppl", "group", "", "same weights"):
        table.add_column(col)
    digests = [{r["round"]: r["digest"] for r in t.rounds() if r["averaged"]} for t in trainers]
    for rnd, r in sorted(reports.items()):
        same = len({d.get(rnd) for d in digests if rnd in d}) == 1 if rnd else True
        bar = "█" * max(1, round(20 * r["val_loss"] / top))
        table.add_row(
            str(rnd),
            f"{r['val_loss']:.3f}",
            f"{math.exp(r['val_loss']):.1f}",
            str(r["group_size"] or "-"),
            bar,
            "yes" if same else "no",
        )
    return table
