"""API keys: who may call `/v1`, how often, and which models.

The key file (`--api-keys FILE`) holds one JSON object per line and never a key itself, only its
sha256: keys are 32 random bytes, so a fast hash is as safe as a slow one and costs nothing per request.
`swarmlm keys create NAME --file FILE` makes a key, prints it once and appends its hash.

Each key has a token bucket of `requests_per_minute` (refilled continuously; full at start) and, if
`models` is set, may only use those models. The key's name is the "user" of the engine's fairness.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from swarmlm.core.files import atomic_write

KEY_PREFIX = "sk-swarmlm-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str
    requests_per_minute: float | None = None  # None: unlimited
    models: tuple[str, ...] | None = None  # None: every model

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


class AuthError(Exception):
    """Why a request is refused: status 401, 403 or 429 and an OpenAI-style code."""

    def __init__(self, status: int, message: str, code: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.retry_after = status, message, code, retry_after


class KeyFileError(ValueError):
    pass


def _parse(line: str, where: str) -> ApiKey:
    try:
        row = json.loads(line)
        key = ApiKey(
            name=row["name"],
            sha256=row["sha256"],
            requests_per_minute=row.get("requests_per_minute"),
            models=tuple(row["models"]) if row.get("models") is not None else None,
        )
    except (ValueError, KeyError, TypeError) as e:
        raise KeyFileError(f"{where}: not a key entry ({e})") from None
    rpm = key.requests_per_minute
    if not isinstance(key.name, str) or not key.name or len(key.sha256) != 64:
        raise KeyFileError(f"{where}: a key needs a name and a 64-hex-digit sha256")
    if rpm is not None and (not isinstance(rpm, int | float) or rpm <= 0):
        raise KeyFileError(f"{where}: requests_per_minute must be a positive number")
    return key


def load_keys(path: str | Path) -> list[ApiKey]:
    """The keys of a key file; KeyFileError naming the file and line for anything malformed."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"cannot read API key file {path}: {e}") from None
    keys = [_parse(line, f"{path}:{n}") for n, line in enumerate(lines, start=1) if line.strip()]
    if not keys:
        raise KeyFileError(f"API key file {path} holds no keys (add one with `swarmlm keys create`)")
    names = [k.name for k in keys]
    if len(set(names)) != len(names):
        raise KeyFileError(f"API key file {path}: key names must be unique")
    return keys


def create_key(
    path: str | Path, name: str, requests_per_minute: float | None = None, models: list[str] | None = None
) -> str:
    """Append a new key to `path` (written whole to a temp file, then renamed); returns the key."""
    path = Path(path)
    keys = load_keys(path) if path.exists() and path.stat().st_size else []
    if any(k.name == name for k in keys):
        raise KeyFileError(f"{path} already has a key named {name!r}")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    entry = ApiKey(name, hash_key(secret), requests_per_minute, tuple(models) if models else None)
    keys.append(entry)
    rows = [{**asdict(k), "models": list(k.models) if k.models is not None else None} for k in keys]
    atomic_write(path, "".join(json.dumps(row) + "\n" for row in rows), mode=0o600)
    return secret


class KeyChecker:
    """Authenticates a request's bearer token and charges its key's bucket. Thread-safe."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self._by_hash = {k.sha256: k for k in keys}
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, at time)
        self._lock = threading.Lock()

    def authenticate(self, authorization: str | None) -> ApiKey:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError(401, "missing API key: send the header 'Authorization: Bearer <key>'", "missing_api_key")
        key = self._by_hash.get(hash_key(token.strip()))
        if key is None:
            raise AuthError(401, "incorrect API key provided", "invalid_api_key")
        return key

    def charge(self, key: ApiKey, now: float | None = None) -> None:
        """Take one request from the key's bucket, or AuthError 429 with the seconds until one is free."""
        if key.requests_per_minute is None:
            return
        now = time.monotonic() if now is None else now
        rate, capacity = key.requests_per_minute / 60.0, key.requests_per_minute
        with self._lock:
            tokens, then = self._buckets.get(key.name, (capacity, now))
            tokens = min(capacity, tokens + (now - then) * rate)
            if tokens < 1.0:
                self._buckets[key.name] = (tokens, now)
                wait = (1.0 - tokens) / rate
                raise AuthError(
                    429,
                    f"rate limit of {key.requests_per_minute:g} requests per minute reached for key {key.name!r}",
                    "rate_limit_exceeded",
                    retry_after=wait,
                )
            self._buckets[key.name] = (tokens - 1.0, now)
