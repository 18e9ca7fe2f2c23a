"""`make demo`'s main job, end to end: a local swarm and its gateway, the openai client, a clean stop."""

from __future__ import annotations

import subprocess
import sys

from swarmlm.launch.peers import free_port


def test_demo_streams_an_answer_and_stops_cleanly() -> None:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "swarmlm.cli",
        "demo",
        "--once",
        "--port",
        str(port),
        "--prompt",
        "What is the capital of France?",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Paris" in done.stdout
    assert f"http://127.0.0.1:{port}/v1" in done.stdout and f"http://127.0.0.1:{port}/dashboard" in done.stdout
    assert "15:30" in done.stdout  # the table of the swarm's peers
    assert "stopped." in done.stdout
    # the server is gone: nothing listens on the port any more
    probe = subprocess.run(
        [sys.executable, "-c", f"import socket; socket.create_connection(('127.0.0.1', {port}), 1)"],
        capture_output=True,
    )
    assert probe.returncode != 0


def test_demo_train_survives_a_crash_and_serves_its_model(tmp_path) -> None:
    """`swarmlm demo train` (shortened): three peers train, one is killed and restarted, the loss curve
    is printed, and a local swarm serves the exported model."""
    port = free_port()
    cmd = [sys.executable, "-m", "swarmlm.cli", "demo", "train", "--work-dir", str(tmp_path), "--rounds", "3"]
    cmd += ["--inner-steps", "6", "--port", str(port)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "killed" in out and "resumed from" in out, out
    assert "validation loss per round" in out and "same weights" in out
    assert " no " not in out.split("validation loss per round")[1].split("serving")[0]  # every round: same weights
    assert "the swarm's model:" in out and "stopped." in out
    assert (tmp_path / "model" / "config.json").exists()
