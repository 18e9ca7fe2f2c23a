"""The per-token cost of three grammar engines on this CPU: llguidance, xgrammar and outlines-core, each
constraining the embedded SmolLM2 tokenizer (49,152 tokens) to a JSON schema.

For each schema a valid answer is tokenized and replayed token by token, as a decoding loop would: the
engine computes the mask of allowed next tokens, the mask is applied to a row of logits (-inf where
disallowed), and the token is consumed. Reported per engine and schema: the tokenizer's setup (ms, once
per server), compile time (ms, the first request with a schema pays it), the engine's median time a token
(mask and consume, µs), and the median and 90th percentile of the whole per-token time (the mask applied
to the logits too, by engine/grammar.py's `apply_bitmask` for all three, µs). A decode step of the served
135M model on this CPU takes some 15-30 ms; `make bench-serve` measures the served cost of constrained
decoding.

    make bench-grammar
    .venv/bin/python bench/grammar_bench.py

Output: a table (stderr); the last line of stdout is `BENCH_JSON {...}`; the same JSON goes to
bench/results/grammar-<time>.json. Past runs: bench/RESULTS.md.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from swarmlm.engine.grammar import apply_bitmask
from swarmlm.model.checkpoint import open_checkpoint
from swarmlm.model.loading import default_model_path
from swarmlm.model.tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: import the sibling modules
from bench_output import save_result

console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)

SCHEMAS: dict[str, tuple[dict[str, Any], Any]] = {
    "flat": (
        {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
            "required": ["name", "age"],
            "additionalProperties": False,
        },
        {"name": "Juliet Capulet", "age": 13},
    ),
    "nested": (
        {
            "type": "object",
            "properties": {
                "play": {"type": "string"},
                "act": {"type": "integer", "minimum": 1, "maximum": 5},
                "speakers": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string"},
                            "mood": {"enum": ["calm", "angry", "in love"]},
                            "lines": {"type": "number", "minimum": 0},
                        },
                        "required": ["name", "mood", "lines"],
                        "additionalProperties": False,
                    },
                },
            },
            "required": ["play", "act", "speakers"],
            "additionalProperties": False,
        },
        {
            "play": "Romeo and Juliet",
            "act": 2,
            "speakers": [
                {"name": "Romeo", "mood": "in love", "lines": 41},
                {"name": "Juliet", "mood": "in love", "lines": 37.5},
                {"name": "Nurse", "mood": "calm", "lines": 3},
            ],
        },
    ),
}

Step = Callable[[torch.Tensor, int], float]  # (logits row, token): mask, consume, apply; -> the engine's seconds


def llguidance_engine(hf: Any, vocab: int) -> Callable[[dict[str, Any]], Step]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=vocab)

    def compile_(schema: dict[str, Any]) -> Step:
        matcher = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema)))
        assert not matcher.is_error(), matcher.get_error()
        mask = llguidance.torch.allocate_token_bitmask(1, vocab)

        def step(logits: torch.Tensor, token: int) -> float:
            t0 = time.perf_counter()
            llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
            assert matcher.consume_token(token), matcher.get_error()
            spent = time.perf_counter() - t0
            apply_bitmask(logits, mask)
            return spent

        return step

    return compile_


def xgrammar_engine(hf: Any, vocab: int) -> Callable[[dict[str, Any]], Step]:
    import xgrammar

    compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab))

    def compile_(schema: dict[str, Any]) -> Step:
        matcher = xgrammar.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema)))
        mask = xgrammar.allocate_token_bitmask(1, vocab)

        def step(logits: torch.Tensor, token: int) -> float:
            t0 = time.perf_counter()
            matcher.fill_next_token_bitmask(mask)
            assert matcher.accept_token(token)
            spent = time.perf_counter() - t0
            apply_bitmask(logits, mask)
            return spent

        return step

    return compile_


def outlines_engine(hf: Any, vocab: int) -> Callable[[dict[str, Any]], Step]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    # Byte-level BPE pieces to their bytes (outlines' own tokenizer adapter does this; core takes bytes).
    byte_of = {ch: b for b, ch in _bytes_to_unicode().items()}
    by_bytes: dict[bytes, list[int]] = {}
    eos = hf.eos_token_id
    for piece, token in hf.get_vocab().items():
        if token != eos and token < vocab and all(c in byte_of for c in piece):
            by_bytes.setdefault(bytes(byte_of[c] for c in piece), []).append(token)
    vocabulary = Vocabulary(eos, by_bytes)

    def compile_(schema: dict[str, Any]) -> Step:
        guide = Guide(Index(build_regex_from_schema(json.dumps(schema)), vocabulary))
        mask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)

        def step(logits: torch.Tensor, token: int) -> float:
            t0 = time.perf_counter()
            guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
            guide.advance(token)
            spent = time.perf_counter() - t0
            apply_bitmask(logits, mask)
            return spent

        return step

    return compile_


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-character table, by which byte-level BPE vocabularies spell bytes."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


ENGINES = {"llguidance": llguidance_engine, "xgrammar": xgrammar_engine, "outlines-core": outlines_engine}


def main() -> None:
    torch.set_num_threads(1)  # masks are applied row by row on the engine's thread: no intra-op threads
    tokenizer = load_tokenizer(open_checkpoint(default_model_path()))
    hf, vocab = tokenizer.hf, len(tokenizer.hf)
    rows = []
    for engine, make in ENGINES.items():
        t0 = time.perf_counter()
        compile_ = make(hf, vocab)
        setup_ms = (time.perf_counter() - t0) * 1000
        for name, (schema, answer) in SCHEMAS.items():
            tokens = tokenizer.encode(json.dumps(answer), False)
            times, engine_times = [], []
            for rep in range(3):  # the first pass compiles and warms up; the last two are timed
                t0 = time.perf_counter()
                step = compile_(schema)
                compile_ms = (time.perf_counter() - t0) * 1000
                logits = torch.randn(len(tokens), vocab)
                for row, token in zip(logits, tokens, strict=True):
                    t0 = time.perf_counter()
                    spent = step(row, token)
                    if rep:
                        times.append(time.perf_counter() - t0)
                        engine_times.append(spent)
                    assert row[token] != float("-inf"), f"{engine} disallowed a valid token"
            per = sorted(times)
            rows.append(
                {
                    "engine": engine,
                    "schema": name,
                    "tokenizer_ms": round(setup_ms, 1),
                    "compile_ms": round(compile_ms, 2),
                    "tokens": len(tokens),
                    "engine_median_us": round(statistics.median(engine_times) * 1e6, 1),
                    "median_us": round(statistics.median(per) * 1e6, 1),
                    "p90_us": round(per[int(0.9 * (len(per) - 1))] * 1e6, 1),
                }
            )
    table = Table(title=f"grammar engines: per-token mask + apply + consume, vocabulary {vocab}")
    for col in ("engine", "schema", "tokenizer ms", "compile ms", "tokens", "engine µs", "median µs", "p90 µs"):
        table.add_column(col)
    for r in rows:
        table.add_row(*(str(v) for v in r.values()))
    console.print(table)
    save_result("grammar", {"vocab": vocab, "rows": rows})


if __name__ == "__main__":
    main()
