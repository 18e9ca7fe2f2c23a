"""A model no single capped process can hold, at a small shape of the generator `make bench-big` uses
(swarmlm/launch/random_model.py): written once, skipped when complete; a span read without holding its
weights twice; `swarmlm serve` refused under a cap; three capped `--layers auto` peers and a gateway
answering with one uncapped process's greedy text."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from swarmlm.launch.peers import PeerProcess, free_port, stop_all
from swarmlm.launch.random_model import INDEX, Shape, write_random_model
from swarmlm.launch.servers import ServerProcess
from swarmlm.model.checkpoint import open_checkpoint
from swarmlm.model.loading import load_model
from swarmlm.model.memory import layer_weight_bytes, span_weight_bytes

pytestmark = pytest.mark.slow

SHAPE = Shape(hidden_size=128, num_layers=6, num_heads=4, num_kv_heads=2, intermediate_size=512)
PROMPTS = ["The river town woke slowly on winter mornings.", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("big") / "random-llama"
    assert write_random_model(out, SHAPE, layers_per_shard=2)
    return out


def test_the_generator_skips_a_complete_model_and_rewrites_a_damaged_one(model_dir: Path) -> None:
    shards = sorted(model_dir.glob("*.safetensors"))
    assert len(shards) == 1 + 3  # the embeddings, then two layers a file
    before = {f.name: f.read_bytes() for f in shards}
    assert not write_random_model(model_dir, SHAPE, layers_per_shard=2)
    shards[-1].write_bytes(b"")
    assert write_random_model(model_dir, SHAPE, layers_per_shard=2)
    assert {f.name: f.read_bytes() for f in sorted(model_dir.glob("*.safetensors"))} == before  # seeded
    config = json.loads((model_dir / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["tie_word_embeddings"]) == ("llama", 128, True)
    assert json.loads((model_dir / INDEX).read_text())["metadata"]["swarmlm_random"]["seed"] == 0


def test_a_span_is_read_in_the_files_dtype_and_leaves_no_file_mapped(model_dir: Path) -> None:
    """bf16 on disk, served in bf16: the same digests as fp32, and no safetensors file still mapped (a
    view into the mapping would keep every page read through it resident)."""
    bf16 = load_model(str(model_dir), layers=(2, 4), dtype="bf16", edges=False)
    assert {p.dtype for p in bf16.span.parameters()} == {torch.bfloat16}
    assert str(model_dir) not in Path("/proc/self/maps").read_text()
    fp32 = load_model(str(model_dir), layers=(2, 4), dtype="fp32", edges=False)
    assert bf16.parts == fp32.parts and set(bf16.parts) == {"layer.2", "layer.3"}


KV_BUDGET = 1 << 20  # bytes: a fixed --kv-budget, so that a cap buys a known number of layers


@pytest.fixture(scope="module")
def peer_cap(model_dir: Path) -> int:
    """A --max-memory that holds two of the six layers and the KV budget, far below the whole model."""
    cfg = open_checkpoint(model_dir).config
    layer = max(layer_weight_bytes(cfg, "bf16", "none"))
    return KV_BUDGET + layer * 5 // 2


def completions(base: str, model_id: str) -> list[str]:
    texts = []
    for prompt in PROMPTS:
        body = {"model": model_id, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["text"])
    return texts


def test_serve_refuses_a_model_over_its_cap_in_one_line(model_dir: Path, peer_cap: int) -> None:
    cfg = open_checkpoint(model_dir).config
    assert span_weight_bytes(cfg, 0, cfg.num_layers, True, "bf16", "none") > 5 * peer_cap
    cmd = [
        "serve",
        "--model",
        str(model_dir),
        "--dtype",
        "bf16",
        "--max-memory",
        str(peer_cap),
        "--port",
        str(free_port()),
    ]
    done = subprocess.run([sys.executable, "-m", "swarmlm.cli", *cmd], capture_output=True, text=True, timeout=120)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "short by" in errors[0] and "--max-memory" in errors[0], errors[0]


def test_three_capped_auto_peers_answer_as_one_uncapped_process(model_dir: Path, peer_cap: int) -> None:
    common = ("--model", str(model_dir), "--dtype", "bf16", "--kv-budget", str(KV_BUDGET))
    auto = ("--layers", "auto", "--max-memory", str(peer_cap), "--rebalance-period", "0", *common)
    server = ServerProcess(*common)
    procs: list[PeerProcess] = []
    try:
        # One after another: an auto peer chooses among the spans announced when it starts.
        for _ in range(3):
            procs.append(PeerProcess(*auto, initial=procs[0].maddr if procs else None).wait_ready())
        assert sorted(p.span() for p in procs) == [(0, 2), (2, 4), (4, 6)]
        api = f"127.0.0.1:{free_port()}"
        procs.append(PeerProcess("--layers", "none", "--api", api, *common, initial=procs[0].maddr).wait_ready())
        swarm = completions(f"http://{api}", model_dir.name)
        alone = completions(server.wait_ready().base, model_dir.name)
    finally:
        stop_all(procs)
        server.stop()
    assert swarm == alone and all(swarm), (swarm, alone)
