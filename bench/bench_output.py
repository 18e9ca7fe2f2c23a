"""Where every benchmark's figures go: bench/results/<bench>-<time>.json (not committed; copy the runs
worth keeping into bench/RESULTS.md) and one `BENCH_JSON {...}` line, the last of stdout, for scripts."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def save_result(bench: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{bench}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print("BENCH_JSON " + json.dumps(result), flush=True)
    return path
