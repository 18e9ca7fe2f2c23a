"""The engine on a CUDA device: skipped, with the reason, on machines without one (CI, these CPUs)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swarmlm.engine.engine import Engine, EngineConfig
from swarmlm.engine.sampling import SamplingParams
from swarmlm.engine.scheduler import make_scheduler
from swarmlm.model.loading import load_model
from tests.model_families import write_family

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = load_model(layers=(0, 0), device="cpu").tokenizer.hf
    return write_family("gemma2", tmp_path_factory.mktemp("cuda") / "gemma2", tokenizer)


def run(model_dir: Path, device: str, dtype: str, params: SamplingParams) -> list[int]:
    model = load_model(str(model_dir), device=device, dtype=dtype)
    engine = Engine(model, make_scheduler("fcfs"), EngineConfig(kv_budget_bytes=64 << 20))
    (seq,) = engine.add(list(range(3, 40)), params, 1)
    while engine.has_work:
        engine.step()
    return seq.output_ids


def test_fp32_on_cuda_computes_as_on_cpu(tiny: Path) -> None:
    ids = torch.arange(3, 40)
    logits = [
        load_model(str(tiny), device=d, dtype="fp32").span(ids.to(d), torch.arange(37).to(d)).cpu()
        for d in ("cuda", "cpu")
    ]
    assert (logits[0] - logits[1]).abs().max() <= 1e-4 * (logits[1].max() - logits[1].min())


def test_seeded_sampling_on_cuda_in_bf16(tiny: Path) -> None:
    """A request's seeded generator lives on the CPU: the step's logits come to it (engine.py)."""
    seeded = SamplingParams(max_tokens=16, temperature=0.8, seed=7)
    first = run(tiny, "cuda", "auto", seeded)
    assert len(first) == 16 and first == run(tiny, "cuda", "auto", seeded)
