"""Decode attention for a batch of sequences: per sequence (what `engine/runner.py` does) against batched.

One decode step's attention for --rows sequences of SmolLM2-135M's shape (9 query heads, 3 KV heads, head
dim 64) with contexts from --min-context up, on one thread:
  per sequence    one fused attention call per sequence over its own contiguous cache (a view, no copy)
  gathered        the caches copied into one padded batch, one call with a length mask: what batching
                  costs with per-sequence caches
  pooled          one call over a padded view of a single pool tensor (as if every cache lived in one
                  [rows, kv_heads, capacity, D] tensor; the copy is not counted): batching at its best
All three give the same output (the max difference is printed).

    make bench-attention
    .venv/bin/python bench/attention_bench.py [--rows 16] [--min-context 100] [--repeats 300]

Output: a table (stderr); the last line of stdout is `BENCH_JSON {...}`; the same JSON goes to
bench/results/attention-<time>.json. Past runs: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import Tensor

from swarmlm.model.llama import AttentionSpec, attention

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: import the sibling module
from bench_output import save_result

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)


def main() -> None:
    ap = argparse.ArgumentParser(description="per-sequence against batched decode attention")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--min-context", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lengths = [args.min_context + 13 * i for i in range(args.rows)]
    capacity = max(lengths)
    pool_k = torch.randn(args.rows, KV_HEADS, capacity, HEAD_DIM)
    pool_v = torch.randn(args.rows, KV_HEADS, capacity, HEAD_DIM)
    q = torch.randn(args.rows, HEADS, 1, HEAD_DIM)
    spec = AttentionSpec()
    mask = (torch.arange(capacity)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]

    def per_sequence() -> Tensor:
        out = torch.empty_like(q)
        for i, n in enumerate(lengths):
            out[i] = attention(q[i : i + 1], pool_k[i : i + 1, :, :n], pool_v[i : i + 1, :, :n], n - 1, spec)[0]
        return out

    def gathered() -> Tensor:
        k = torch.zeros(args.rows, KV_HEADS, capacity, HEAD_DIM)
        v = torch.zeros(args.rows, KV_HEADS, capacity, HEAD_DIM)
        for i, n in enumerate(lengths):  # each sequence's own cache, copied into the batch
            k[i, :, :n] = pool_k[i, :, :n]
            v[i, :, :n] = pool_v[i, :, :n]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def pooled() -> Tensor:
        return F.scaled_dot_product_attention(q, pool_k, pool_v, attn_mask=mask, enable_gqa=True)

    reference = per_sequence()
    ways: dict[str, Callable[[], Tensor]] = {"per sequence": per_sequence, "gathered": gathered, "pooled": pooled}
    results = {}
    for name, way in ways.items():
        diff = (way() - reference).abs().max().item()
        for _ in range(20):
            way()
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            way()
        results[name] = {"ms": (time.perf_counter() - t0) / args.repeats * 1e3, "max_diff": diff}
    table = Table(title=f"decode attention, {args.rows} rows, contexts {lengths[0]}-{lengths[-1]}, one thread")
    for column in ("way", "ms per layer", "vs per sequence", "max difference"):
        table.add_column(column)
    base = results["per sequence"]["ms"]
    for name, r in results.items():
        table.add_row(name, f"{r['ms']:.3f}", f"{r['ms'] / base:.2f}x", f"{r['max_diff']:.1e}")
    console.print(table)
    save_result("attention", {"rows": args.rows, "lengths": lengths, "results": results})


if __name__ == "__main__":
    main()
