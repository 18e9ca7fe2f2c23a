"""The canonical encoding: one byte string per JSON value, so two peers sign and hash the same bytes."""

from __future__ import annotations

import json
from typing import Any


def canonical(value: Any) -> bytes:
    """One byte string per JSON value: what is signed and hashed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
