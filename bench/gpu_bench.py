"""GPU benchmark: SmolLM2-1.7B's shape (seeded random weights) on one CUDA device, swarmlm's engine against
transformers' `generate`, in the same process and run, one after the other.

  model      the 1.7B-shape checkpoint of `make big-model` (`launch/random_model.py`), written unless present
  swarmlm    `load_model(device="cuda", dtype="bf16")` and the serving engine (skip-join MLFQ, its default KV
             budget from free GPU memory): one stream, then STREAMS streams at once; greedy, every request
             PROMPT prompt tokens and NEW new tokens (EOS ignored)
  hf         transformers' LlamaForCausalLM from the same directory, bf16 on the same GPU: `generate` with
             one prompt, then the STREAMS prompts as one batch (same lengths: no padding), greedy
  bandwidth  the bytes one single-stream decode step reads (weights, plus the KV of its mean context) over
             its time, as a fraction of the device's copy bandwidth (measured: a 2 GiB device-to-device
             copy, reads plus writes) and of its nominal bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s)

Single-stream decode tok/s is (NEW - 1) tokens over the time after the first token; STREAMS-stream tok/s
is every generated token over the wall time of the whole batch, prefill included, for both. The prompts are
one text's tokens rotated by the stream's index, so no two share a prefix block (the prefix cache would
flatter swarmlm). Both greedy token streams are compared: bf16 kernels differ, so they may part after a
few tokens; the count of identical leading tokens is reported, not asserted.

The device machine has PyTorch, transformers, safetensors and tokenizers but neither the embedded GGUF nor
the gguf package, so the tokenizer travels as a tiny checkpoint written here first:

    make bench-gpu                                   # on a machine with CUDA and this project installed
    .venv/bin/python bench/gpu_bench.py --prepare    # here: .cache/gpu-bench-tokenizer (a few MB)
    PYTHONPATH=. python3 bench/gpu_bench.py --tokenizer-from .cache/gpu-bench-tokenizer   # there
    .venv/bin/python bench/gpu_bench.py --device cpu --tiny   # this script's own check, on a CPU

(with the `device` tool: carry `.cache/gpu-bench-tokenizer`). Output: a table (stderr); the last line of
stdout is `BENCH_JSON {...}`; the same JSON goes to bench/results/gpu-<time>.json. Past runs: RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from swarmlm.engine.engine import Engine, EngineConfig
from swarmlm.engine.sampling import SamplingParams
from swarmlm.engine.scheduler import make_scheduler
from swarmlm.launch.random_model import DEFAULT_DIR, SMOLLM2_1_7B, Shape, write_random_model
from swarmlm.model.loading import LoadedModel, load_model
from swarmlm.model.memory import kv_bytes_per_token, module_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: import the sibling module
from bench_output import save_result

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = ROOT / ".cache" / "gpu-bench-tokenizer"
TINY = Shape(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=128)
NOMINAL_TBS = {"H100": 3.35, "H200": 4.8}  # HBM3 / HBM3e, SXM parts' data sheets
TEXT = (
    "The river town woke slowly on winter mornings. Fishermen pushed their boats into the grey water, "
    "bakers lit their ovens before dawn, and the ferry sounded its horn twice as it left the pier. "
)
console = Console(stderr=True, width=None if sys.stderr.isatty() else 150)


def prompts(model: LoadedModel, length: int, streams: int) -> list[list[int]]:
    ids = model.tokenizer.encode(TEXT * (length // 20 + 1))[:length]
    return [ids[i % length :] + ids[: i % length] for i in range(streams)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_swarmlm(model: LoadedModel, batch: list[list[int]], new: int) -> dict[str, object]:
    """Every request added at once; returns the wall time, the first token's time and the tokens."""
    engine = Engine(model, make_scheduler("mlfq"), EngineConfig(max_batch_seqs=max(32, len(batch))))
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    device = next(model.span.parameters()).device
    sync(device)
    start = time.perf_counter()
    seqs = [engine.add(ids, params)[0] for ids in batch]
    first = None
    while engine.has_work:
        engine.step()
        if first is None and all(s.output_ids for s in seqs):
            first = time.perf_counter() - start
    wall = time.perf_counter() - start
    kv_budget = engine.executor.kv.budget_bytes  # the default: what free memory leaves, at most 8 GiB
    return {"wall": wall, "first": first, "tokens": [s.output_ids for s in seqs], "kv_budget": kv_budget}


def run_hf(hf: torch.nn.Module, batch: list[list[int]], new: int, device: torch.device) -> dict[str, object]:
    inputs = torch.tensor(batch, device=device)
    kwargs = {"do_sample": False, "pad_token_id": 0, "attention_mask": torch.ones_like(inputs)}
    sync(device)
    start = time.perf_counter()
    hf.generate(inputs, max_new_tokens=1, min_new_tokens=1, **kwargs)
    sync(device)
    first = time.perf_counter() - start
    start = time.perf_counter()
    out = hf.generate(inputs, max_new_tokens=new, min_new_tokens=new, **kwargs)
    sync(device)
    wall = time.perf_counter() - start
    return {"wall": wall, "first": first, "tokens": out[:, inputs.shape[1] :].tolist()}


def single_tok_s(run: dict[str, object], new: int) -> float:
    return (new - 1) / (float(run["wall"]) - float(run["first"]))


def batch_tok_s(run: dict[str, object], new: int, streams: int) -> float:
    return new * streams / float(run["wall"])


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30, repeats: int = 10) -> float:
    """Bytes per second a device-to-device copy moves (each byte read once and written once)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * repeats / (time.perf_counter() - start)


def step_bytes(model: LoadedModel, dtype: str, prompt: int, new: int) -> int:
    """What one single-stream decode step reads: every weight once, and the KV of the mean context."""
    kv_per_token = kv_bytes_per_token(model.config, model.config.num_layers, dtype)
    return module_bytes(model.span) + kv_per_token * (prompt + new // 2)


def main() -> None:
    ap = argparse.ArgumentParser(description="swarmlm's engine against transformers' generate on one GPU")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--tokenizer-from", type=Path, help="a checkpoint with SmolLM2's tokenizer (see --prepare)")
    ap.add_argument("--prepare", action="store_true", help=f"write {TOKENIZER_DIR.relative_to(ROOT)} and stop")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model: this script's own check on a CPU")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--streams", type=int, default=32)
    args = ap.parse_args()
    if args.prepare:
        write_random_model(TOKENIZER_DIR, TINY)
        print(f"{TOKENIZER_DIR}: ready; carry it to the GPU machine")
        return
    shape, model_dir = (TINY, ROOT / ".cache" / "gpu-bench-tiny") if args.tiny else (SMOLLM2_1_7B, args.model)
    if args.tiny:
        args.prompt, args.new, args.streams = 16, 8, 4
    t0 = time.perf_counter()
    write_random_model(model_dir, shape, source=args.tokenizer_from)
    console.print(f"model ready in {time.perf_counter() - t0:.0f} s: {model_dir}")
    device = torch.device(args.device)
    dtype = "bf16" if device.type == "cuda" else "fp32"

    model = load_model(str(model_dir), dtype=dtype, device=args.device)
    batch = prompts(model, args.prompt, args.streams)
    run_swarmlm(model, batch[:1], 4)  # warm-up: kernels, allocator, cuBLAS's choices
    ours_one = run_swarmlm(model, batch[:1], args.new)
    ours_many = run_swarmlm(model, batch, args.new)
    moved = step_bytes(model, dtype, args.prompt, args.new)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()

    from transformers import AutoModelForCausalLM

    hf_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir)).to(device=device, dtype=hf_dtype).eval()
    with torch.inference_mode():
        run_hf(hf, batch[:1], 4, device)
        hf_one = run_hf(hf, batch[:1], args.new, device)
        hf_many = run_hf(hf, batch, args.new, device)
    del hf

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    copy = copy_bandwidth(device) if device.type == "cuda" else float("nan")
    nominal = next((tbs * 1e12 for key, tbs in NOMINAL_TBS.items() if key in name), float("nan"))
    reached = moved * single_tok_s(ours_one, args.new)
    result = {
        "device": name,
        "torch": torch.__version__,
        "model": str(model_dir.name),
        "dtype": dtype,
        "prompt_tokens": args.prompt,
        "new_tokens": args.new,
        "streams": args.streams,
        "swarmlm_single_tok_s": round(single_tok_s(ours_one, args.new), 2),
        "hf_single_tok_s": round(single_tok_s(hf_one, args.new), 2),
        "swarmlm_batch_tok_s": round(batch_tok_s(ours_many, args.new, args.streams), 2),
        "hf_batch_tok_s": round(batch_tok_s(hf_many, args.new, args.streams), 2),
        "swarmlm_first_token_s": round(float(ours_one["first"]), 4),
        "hf_first_token_s": round(float(hf_one["first"]), 4),
        "kv_budget_bytes": ours_one["kv_budget"],
        "step_bytes": moved,
        "reached_bytes_s": round(reached),
        "copy_bytes_s": round(copy) if copy == copy else None,
        "fraction_of_copy": round(reached / copy, 3) if copy == copy else None,
        "fraction_of_nominal": round(reached / nominal, 3) if nominal == nominal else None,
        "single_identical_prefix": common_prefix(ours_one["tokens"][0], hf_one["tokens"][0]),
        "batch_identical_prefix_min": min(
            common_prefix(a, b) for a, b in zip(ours_many["tokens"], hf_many["tokens"], strict=True)
        ),
    }
    table = Table(title=f"{name}: {model_dir.name}, {dtype}, prompt {args.prompt}, new {args.new}")
    for column in ("", "swarmlm", "transformers", "ratio"):
        table.add_column(column)
    for label, ours, theirs in (
        ("1 stream, decode tok/s", result["swarmlm_single_tok_s"], result["hf_single_tok_s"]),
        (f"{args.streams} streams, tok/s", result["swarmlm_batch_tok_s"], result["hf_batch_tok_s"]),
    ):
        table.add_row(label, f"{ours:.1f}", f"{theirs:.1f}", f"{ours / theirs:.2f}")
    console.print(table)
    console.print(
        f"single-stream decode reads {moved / 1e9:.2f} GB a step: {reached / 1e9:.0f} GB/s, "
        f"{result['fraction_of_copy']} of copy bandwidth, {result['fraction_of_nominal']} of nominal; "
        f"greedy tokens identical for the first {result['single_identical_prefix']} (single stream)"
    )
    save_result("gpu", result)


if __name__ == "__main__":
    main()
