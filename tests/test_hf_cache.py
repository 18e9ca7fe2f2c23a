"""`--model ORG/NAME` found in the local Hugging Face cache, offline: the cache is laid out by
huggingface_hub itself (`hf_hub_download` from a local stand-in for the hub serving a model folder's
files), then `swarmlm serve` runs with HF_HUB_OFFLINE=1 and serves the model under that name."""

from __future__ import annotations

import hashlib
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from swarmlm.launch.servers import ServerProcess
from tests.test_cli_errors import USAGE, assert_error, swarmlm

COMMIT = "5" * 40


def hub_serving(folder: Path) -> type[BaseHTTPRequestHandler]:
    class Hub(BaseHTTPRequestHandler):
        """The two calls hf_hub_download makes: HEAD (commit, etag, size) and GET of a file's bytes."""

        def do_HEAD(self) -> None:
            self._answer(send_body=False)

        def do_GET(self) -> None:
            self._answer(send_body=True)

        def _answer(self, send_body: bool) -> None:
            _, _, name = urllib.parse.unquote(self.path).partition("/resolve/main/")
            file = folder / name
            if not name or not file.is_file():
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.end_headers()
                return
            data = file.read_bytes()
            self.send_response(200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if send_body:
                self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: the test's output is not the place for a request log."""

    return Hub


@pytest.fixture
def hf_cache(tiny_llama: Path, tmp_path: Path) -> Iterator[Path]:
    from huggingface_hub import hf_hub_download

    cache = tmp_path / "hub"
    hub = ThreadingHTTPServer(("127.0.0.1", 0), hub_serving(tiny_llama))
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{hub.server_address[1]}"
        for file in sorted(p.name for p in tiny_llama.iterdir() if p.is_file()):
            hf_hub_download("house/tiny-llama", file, cache_dir=cache, endpoint=endpoint)
    finally:
        hub.shutdown()
    yield cache


def test_a_model_named_org_name_is_served_from_the_cache(hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert (hf_cache / "models--house--tiny-llama" / "snapshots" / COMMIT / "config.json").is_symlink()
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    server = ServerProcess("--model", "house/tiny-llama")
    try:
        server.wait_ready()
        assert [m["id"] for m in httpx.get(f"{server.base}/v1/models").json()["data"]] == ["house/tiny-llama"]
        body = {"model": "house/tiny-llama", "prompt": "Hello", "max_tokens": 3, "ignore_eos": True}
        answer = httpx.post(f"{server.base}/v1/completions", json=body, timeout=60).json()
        assert answer["usage"]["completion_tokens"] == 3
    finally:
        server.stop()
    missing = swarmlm("serve", "--model", "house/no-such-model")
    assert_error(missing, USAGE, "'house/no-such-model' not found", "not in the Hugging Face cache", str(hf_cache))
