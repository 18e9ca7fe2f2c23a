"""Every bad input through the real command line: one `error:` line saying what to do, the documented
exit code (2 bad input, 3 swarm unreachable), and never a traceback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from swarmlm.core.identity import Identity
from swarmlm.launch.peers import free_port

USAGE, UNREACHABLE = 2, 3


def swarmlm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "swarmlm.cli", *args], capture_output=True, text=True, timeout=timeout)


def assert_error(done: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output
    assert all(w in errors[0] for w in words), errors[0]
    assert done.returncode == code, output


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def unreachable_peer() -> str:
    """A well-formed multiaddr of a peer that is not there: a free port, a real peer id."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"/ip4/127.0.0.1/tcp/{port}/p2p/{Identity.generate().peer_id}"


TRAIN = ("train", "--data", "no-data", "--run-dir", "no-run")


@pytest.mark.parametrize("command", [("peer",), ("dht",), ("status",), TRAIN], ids=lambda c: c[0])
def test_a_garbage_multiaddr(command: tuple[str, ...]) -> None:
    assert_error(swarmlm(*command, "--initial-peers", "garbage"), USAGE, "--initial-peers 'garbage'", "multiaddr")


def test_a_garbage_announce_address() -> None:
    assert_error(swarmlm("dht", "--announce-maddrs", "garbage"), USAGE, "--announce-maddrs 'garbage'", "multiaddr")


def test_a_multiaddr_without_a_peer_id() -> None:
    assert_error(swarmlm("status", "--initial-peers", "/ip4/127.0.0.1/tcp/1"), USAGE, "/p2p/PEER_ID")


def test_status_needs_a_way_into_the_swarm() -> None:
    assert_error(swarmlm("status"), USAGE, "--initial-peers", "--gateway")
    assert_error(swarmlm("status", "--gateway", "http://127.0.0.1:x"), USAGE, "is not a URL")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert_error(swarmlm("status", "--gateway", f"127.0.0.1:{port}"), UNREACHABLE, "could not reach gateway")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli-data")
    (folder / "a.txt").write_text("".join(f"a tiny corpus, line {i}\n" for i in range(200)))
    out = folder / "prepared"
    done = swarmlm("data", "prepare", str(folder / "a.txt"), "--out", str(out), "--train-tokenizer", "300")
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize("command", [("status",), ("peer", "--layers", "0:1"), ("dht",)], ids=lambda c: c[0])
def test_an_unreachable_swarm_is_exit_code_3(command: tuple[str, ...]) -> None:
    done = swarmlm(*command, "--initial-peers", unreachable_peer(), timeout=60)
    assert_error(done, UNREACHABLE, "could not reach any of --initial-peers")


def test_a_trainer_that_reaches_no_peer_is_exit_code_3(tiny_data: Path, tmp_path: Path) -> None:
    done = swarmlm(
        "train", "--data", str(tiny_data), "--run-dir", str(tmp_path), "--initial-peers", unreachable_peer(), timeout=60
    )
    assert_error(done, UNREACHABLE, "could not reach any of --initial-peers")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["serve", "peer"])
def test_device_cuda_without_cuda(command: str) -> None:
    done = swarmlm(command, "--device", "cuda", timeout=60)
    assert_error(done, USAGE, "--device cuda", "no CUDA")
    assert "swarmlm peer" not in done.stdout  # refused before joining a swarm


@pytest.mark.parametrize("command", ["peer", "dht"])
@pytest.mark.parametrize(
    ("public_ip", "words"), [("1.2.3", "is not an IP address"), ("1.2.3.4", "needs a fixed port to announce")]
)
def test_a_public_ip_that_cannot_be_announced(command: str, public_ip: str, words: str) -> None:
    done = swarmlm(command, "--public-ip", public_ip, timeout=60)
    assert_error(done, USAGE, "--public-ip", words)
    assert "others join" not in done.stdout  # refused before a DHT node started


@pytest.mark.parametrize("args", [("serve", "--port", "99999"), ("peer", "--api", "127.0.0.1:99999")])
def test_a_port_out_of_range(args: tuple[str, ...]) -> None:
    assert_error(swarmlm(*args), USAGE, "99999", "65535")


def test_a_busy_port_is_refused_before_the_model_loads(busy_port: int) -> None:
    done = swarmlm("serve", "--port", str(busy_port), timeout=30)
    assert_error(done, USAGE, f"--port: cannot listen on 127.0.0.1:{busy_port}")
    assert "swarmlm.serve" not in done.stderr  # no log line: nothing was loaded


def test_a_negative_number_of_micro_batches() -> None:
    assert_error(swarmlm("peer", "--api", "127.0.0.1:8931", "--micro-batches", "-1"), USAGE, "--micro-batches", "-1")


def test_a_busy_gateway_port(busy_port: int) -> None:
    done = swarmlm("peer", "--api", f"127.0.0.1:{busy_port}", timeout=30)
    assert_error(done, USAGE, f"--api: cannot listen on 127.0.0.1:{busy_port}")


def test_layers_backwards_says_what_the_model_has() -> None:
    assert_error(
        swarmlm("peer", "--layers", "5:2"),
        USAGE,
        "--layers 5:2: START must be below END; the model has layers 0:30 (30 layers)",
    )


def test_a_model_larger_than_max_memory_is_refused_before_loading() -> None:
    done = swarmlm("serve", "--max-memory", "500MB", "--device", "cpu")  # 135M fp32 weights + 8192 tokens of KV
    assert_error(
        done,
        USAGE,
        "the model needs 915.5 MB (weights 538.1 MB + KV 377.5 MB), --max-memory is 500.0 MB: short by 415.5 MB; "
        "run it on a swarm (swarmlm peer --layers auto)",
    )
    assert "swarmlm.serve" not in done.stderr  # no log line: nothing was loaded


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--max-memory", "20MB"), "one layer needs 26.7 MB (weights 14.2 MB + KV 12.6 MB), --max-memory is 20.0 MB"),
        (("--layers", "0:30", "--max-memory", "0.5GB"), "layers 0:30 need 802.3 MB (weights 424.8 MB + KV 377.5 MB)"),
    ],
    ids=["auto", "fixed"],
)
def test_a_peer_whose_memory_cannot_hold_its_layers(args: tuple[str, ...], words: str) -> None:
    done = swarmlm("peer", *args)
    assert_error(done, USAGE, words)
    assert "others join with" not in done.stdout  # it never joined the DHT


@pytest.mark.parametrize("flag", ["--max-memory", "--kv-budget"])
def test_a_size_that_is_not_one(flag: str) -> None:
    assert_error(swarmlm("peer", flag, "2XB"), USAGE, f"{flag} '2XB': not a size", "8GiB")


@pytest.mark.parametrize("name", ["serve", "peer"])
def test_a_chat_template_that_is_missing_or_broken(name: str, tmp_path: Path) -> None:
    command = ("serve",) if name == "serve" else ("peer", "--api", f"127.0.0.1:{free_port()}")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }}")  # no endfor
    missing = tmp_path / "missing.jinja"
    assert_error(swarmlm(*command, "--chat-template", str(missing)), USAGE, f"--chat-template {missing}: cannot")
    assert_error(swarmlm(*command, "--chat-template", str(broken)), USAGE, "not a Jinja template")


def test_an_unknown_model() -> None:
    assert_error(swarmlm("serve", "--model", "no/such/model.gguf"), USAGE, "'no/such/model.gguf' not found")


@pytest.mark.parametrize("command", ["serve", "peer"])
def test_an_unsupported_model_family_lists_the_supported(command: str, tmp_path: Path) -> None:
    config = {"model_type": "gpt2", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8}
    (tmp_path / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 1, "num_attention_heads": 1}))
    done = swarmlm(command, "--model", str(tmp_path))
    assert_error(done, USAGE, "model_type 'gpt2' is not supported; swarmlm runs: llama, mistral, mixtral, qwen2")


def test_an_unknown_option_is_one_line_too() -> None:
    assert_error(swarmlm("serve", "--no-such-option"), USAGE, "--no-such-option", "swarmlm serve -h")


@pytest.mark.parametrize("command", [(), ("serve",), ("data", "prepare")], ids=lambda c: " ".join(c) or "swarmlm")
def test_dash_h_is_help(command: tuple[str, ...]) -> None:
    done = swarmlm(*command, "-h")
    assert done.returncode == 0 and "Usage: swarmlm" in done.stdout, done.stderr


def test_help_documents_the_exit_codes() -> None:
    done = swarmlm("--help")
    assert "Exit codes" in done.stdout and "unreachable" in done.stdout


def test_version() -> None:
    from swarmlm.core.version import __version__

    done = swarmlm("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"swarmlm {__version__}"
