"""API keys: a real `swarmlm serve --api-keys` answers 401 / 403 / 429 the OpenAI way, keeps /health open,
guards /metrics on request; key files hold hashes only and bad ones are named."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from swarmlm.launch.servers import ServerProcess
from swarmlm.serve.auth import ApiKey, KeyChecker, KeyFileError, create_key, hash_key, load_keys


def test_key_file_holds_hashes_only(tmp_path: Path) -> None:
    path = tmp_path / "keys.jsonl"
    alice = create_key(path, "alice", 30, ["m"])
    bob = create_key(path, "bob")
    assert alice not in path.read_text() and hash_key(alice) in path.read_text()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    keys = load_keys(path)
    assert keys == [ApiKey("alice", hash_key(alice), 30, ("m",)), ApiKey("bob", hash_key(bob))]
    checker = KeyChecker(keys)
    assert checker.authenticate(f"Bearer {bob}").name == "bob"
    with pytest.raises(KeyFileError, match="already has a key named 'bob'"):
        create_key(path, "bob")


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("", "holds no keys"),
        ("{not json\n", "keys.jsonl:1: not a key entry"),
        ('{"name": "a", "sha256": "00"}\n', "64-hex-digit"),
        (json.dumps({"name": "a", "sha256": "0" * 64, "requests_per_minute": -1}) + "\n", "positive"),
    ],
)
def test_bad_key_files_are_named(tmp_path: Path, content: str, error: str) -> None:
    path = tmp_path / "keys.jsonl"
    path.write_text(content)
    with pytest.raises(KeyFileError, match=error):
        load_keys(path)


def test_rate_limit_is_a_token_bucket() -> None:
    key = ApiKey("a", "0" * 64, requests_per_minute=2)
    checker = KeyChecker([key])
    checker.charge(key, now=0.0)
    checker.charge(key, now=0.0)  # a full bucket allows a burst of rpm requests
    with pytest.raises(Exception, match="rate limit") as refused:
        checker.charge(key, now=1.0)
    assert refused.value.retry_after == pytest.approx(29.0)  # one request per 30 s refills
    checker.charge(key, now=31.0)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    path = tmp_path_factory.mktemp("keys") / "keys.jsonl"
    return {
        "path": str(path),
        "alice": create_key(path, "alice", requests_per_minute=3),
        "bob": create_key(path, "bob", models=["another-model"]),
    }


@pytest.fixture(scope="module")
def guarded(keys: dict[str, str]) -> Iterator[ServerProcess]:
    srv = ServerProcess("--api-keys", keys["path"], "--protect-metrics", "--max-batch-seqs", "4")
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def _client(server: ServerProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=key, max_retries=0, timeout=60)


def test_keys_guard_every_v1_endpoint(guarded: ServerProcess, keys: dict[str, str]) -> None:
    assert httpx.get(f"{guarded.base}/health").status_code == 200  # open to load balancers
    no_key = httpx.get(f"{guarded.base}/v1/models")
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "missing_api_key"
    assert no_key.headers["www-authenticate"] == "Bearer"
    invalid_body = httpx.post(f"{guarded.base}/v1/chat/completions", json={"messages": "hello"})
    assert invalid_body.status_code == 401  # the key is checked before the body is validated
    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        _client(guarded, "sk-swarmlm-wrong").models.list()
    model_id = _client(guarded, keys["bob"]).models.list().data[0].id
    with pytest.raises(openai.PermissionDeniedError, match="may not use model"):
        _client(guarded, keys["bob"]).completions.create(model=model_id, prompt="Hi", max_tokens=1)
    assert httpx.get(f"{guarded.base}/metrics").status_code == 401
    metrics = httpx.get(f"{guarded.base}/metrics", headers={"Authorization": f"Bearer {keys['bob']}"})
    assert metrics.status_code == 200 and "swarmlm" in metrics.text


def test_rate_limit_answers_429_with_retry_after(guarded: ServerProcess, keys: dict[str, str]) -> None:
    alice = _client(guarded, keys["alice"])
    model_id = alice.models.list().data[0].id  # 1 of alice's 3 requests per minute
    for _ in range(2):
        assert alice.completions.create(model=model_id, prompt="Hi", max_tokens=1).choices[0].text is not None
    refused = httpx.get(f"{guarded.base}/v1/models", headers={"Authorization": f"Bearer {keys['alice']}"})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 20
    assert _client(guarded, keys["bob"]).models.list().data  # another key is not slowed by alice's limit


def test_a_bad_key_file_stops_the_server_with_a_clear_error(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "swarmlm.cli", "serve", "--api-keys", str(tmp_path / "missing.jsonl")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "cannot read API key file" in done.stderr, done.stderr
