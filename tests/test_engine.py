"""The engine on the real model: batching, preemption, prefix cache and sampling never change outputs."""

from __future__ import annotations

import pytest
import torch

from swarmlm.engine.engine import Engine, EngineConfig
from swarmlm.engine.sampling import SamplingParams
from swarmlm.engine.scheduler import make_scheduler
from swarmlm.engine.sequence import FinishReason, Sequence
from swarmlm.engine.stopping import StopChecker
from swarmlm.model.loading import LoadedModel

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain gravity in one sentence.",
    "¿Cuál es la capital de España?",
    "List three prime numbers.",
]
GREEDY = SamplingParams(max_tokens=24, temperature=0)


def prompts(model: LoadedModel) -> list[list[int]]:
    tok = model.tokenizer
    return [tok.encode(tok.chat_prompt([{"role": "user", "content": q}])) for q in QUESTIONS]


def make_engine(model: LoadedModel, scheduler: str = "mlfq", **config: int) -> Engine:
    return Engine(model, make_scheduler(scheduler), EngineConfig(**config))


def run(engine: Engine, requests: list[tuple[list[int], SamplingParams]]) -> list[Sequence]:
    seqs = [s for ids, params in requests for s in engine.add(ids, params)]
    while engine.has_work:
        engine.step()
    return seqs


@pytest.fixture(scope="module")
def one_at_a_time(model: LoadedModel) -> list[list[int]]:
    engine = make_engine(model, max_batch_seqs=1)
    return [run(engine, [(ids, GREEDY)])[0].output_ids for ids in prompts(model)]


def test_batched_equals_one_at_a_time(model: LoadedModel, one_at_a_time: list[list[int]]) -> None:
    for scheduler in ("fcfs", "mlfq"):
        engine = make_engine(model, scheduler)
        seqs = run(engine, [(ids, GREEDY) for ids in prompts(model)])
        assert [s.output_ids for s in seqs] == one_at_a_time
        assert max(engine.steps, 1) < sum(len(o) for o in one_at_a_time)  # really batched


def test_tiny_kv_budget_preempts_and_recomputes(model: LoadedModel, one_at_a_time: list[list[int]]) -> None:
    layout_bytes = 2 * model.config.num_layers * model.config.num_kv_heads * model.config.head_dim * 4
    engine = make_engine(model, kv_budget_bytes=layout_bytes * 96)
    seqs = run(engine, [(ids, GREEDY) for ids in prompts(model)])
    assert engine.executor.preemptions > 0
    assert [s.output_ids for s in seqs] == one_at_a_time
    assert engine.executor.kv.used_tokens == 0  # everything freed


def test_chunked_prefill_is_exact(model: LoadedModel, one_at_a_time: list[list[int]]) -> None:
    engine = make_engine(model, max_step_tokens=7)
    seqs = run(engine, [(ids, GREEDY) for ids in prompts(model)])
    assert [s.output_ids for s in seqs] == one_at_a_time
    # again, now starting from cached prefixes that are longer than one chunk
    hits = engine.executor.kv.prefix_hits
    seqs = run(engine, [(ids, GREEDY) for ids in prompts(model)])
    assert engine.executor.kv.prefix_hits - hits > 7 * len(seqs)
    assert [s.output_ids for s in seqs] == one_at_a_time


def test_prefix_cache_hits_give_identical_outputs(model: LoadedModel, one_at_a_time: list[list[int]]) -> None:
    engine = make_engine(model)
    ids = prompts(model)
    first = run(engine, [(ids[0], GREEDY)])[0]
    hits_before = engine.executor.kv.prefix_hits
    again = run(engine, [(ids[0], GREEDY), (ids[2], GREEDY)])
    assert engine.executor.kv.prefix_hits - hits_before >= 32  # the repeated prompt and the shared system prompt
    assert first.output_ids == again[0].output_ids == one_at_a_time[0]
    assert again[1].output_ids == one_at_a_time[2]


def test_seeded_sampling_is_reproducible_in_any_batch(model: LoadedModel) -> None:
    ids = prompts(model)
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    alone = run(make_engine(model), [(ids[1], params)])[0].output_ids
    crowd = run(make_engine(model), [(ids[0], GREEDY), (ids[1], params), (ids[2], GREEDY)])[1].output_ids
    assert alone == crowd
    other = run(make_engine(model), [(ids[1], SamplingParams(**{**params.__dict__, "seed": 99}))])[0].output_ids
    assert other != alone


def test_n_sequences_differ_and_share_the_prompt(model: LoadedModel) -> None:
    engine = make_engine(model)
    seqs = engine.add(prompts(model)[1], SamplingParams(max_tokens=16, temperature=1.0, seed=7), n=3)
    while engine.has_work:
        engine.step()
    assert [s.index for s in seqs] == [0, 1, 2]
    assert len({tuple(s.output_ids) for s in seqs}) > 1


def test_stop_strings_tokens_and_length(model: LoadedModel, one_at_a_time: list[list[int]]) -> None:
    ids = prompts(model)[0]
    engine = make_engine(model)
    full = model.tokenizer.decode(one_at_a_time[0])
    assert "Paris" in full
    (by_string,) = run(engine, [(ids, SamplingParams(max_tokens=24, temperature=0, stop=["Paris"]))])
    assert by_string.text == full[: full.index("Paris")] and by_string.finish_reason == FinishReason.STOP
    second = one_at_a_time[0][1]
    (by_token,) = run(engine, [(ids, SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[second]))])
    assert by_token.output_ids == one_at_a_time[0][:2] and by_token.finish_reason == FinishReason.STOP
    (by_length,) = run(engine, [(ids, SamplingParams(max_tokens=3, temperature=0))])
    assert by_length.output_ids == one_at_a_time[0][:3] and by_length.finish_reason == FinishReason.LENGTH
    (past_eos,) = run(engine, [(ids, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))])
    assert len(past_eos.output_ids) == 12


def test_streamed_text_holds_back_a_stop_string_that_spans_tokens(model: LoadedModel) -> None:
    """The StopChecker every decode loop uses: text that may begin a stop string is not shown until the
    string is ruled out; once it completes, the text ends before it and nothing of it was shown."""
    checker = StopChecker(model.tokenizer, context=64)
    seq = Sequence("r", 0, [1], SamplingParams(max_tokens=50, stop=["answer is"]), "", 0.0, None)
    shown = []
    tokens = model.tokenizer.encode(" Paris.\n\nThe answer is: 2018")
    for token in tokens:
        seq.output_ids.append(token)
        seq.finish_reason = checker.check(seq)
        shown.append(checker.take_text(seq))
        assert "answer"[:3] not in "".join(shown)
        if seq.finished:
            break
    assert seq.finish_reason == FinishReason.STOP and len(seq.output_ids) < len(tokens)
    assert "".join(shown) == seq.text == " Paris.\n\nThe "
    seq = Sequence("r", 0, list(range(10, 70)), SamplingParams(max_tokens=50), "", 0.0, None)
    for token in tokens[:4]:
        seq.output_ids.append(token)
        assert checker.check(seq) == (FinishReason.LENGTH if seq.num_tokens == 64 else None)


def test_logprobs_are_the_models_distribution(model: LoadedModel) -> None:
    ids = prompts(model)[0]
    (seq,) = run(make_engine(model), [(ids, SamplingParams(max_tokens=4, temperature=0, logprobs=5))])
    with torch.no_grad():
        logits = model.span(torch.tensor([ids]), torch.arange(len(ids)))[0, -1]
    expected = logits.log_softmax(-1)
    first = seq.logprobs[0]
    assert first.token_id == seq.output_ids[0] == int(expected.argmax())
    assert abs(first.logprob - float(expected.max())) < 1e-4
    assert [t for t, _ in first.top] == expected.topk(5).indices.tolist()
    assert all(a >= b for (_, a), (_, b) in zip(first.top, first.top[1:], strict=False))


def test_prompt_logprobs_are_the_models_over_chunks_and_a_cached_prefix(model: LoadedModel) -> None:
    """Each prompt token's logprob under the whole model's logits at the position before it (the first
    token: none), whether the prompt runs in one chunk or in 7-token chunks beside another sequence, and
    when the prompt's prefix is in the cache (a scored prompt runs every position again)."""
    ids = prompts(model)[1]
    with torch.no_grad():
        logits = model.span(torch.tensor([ids]), torch.arange(len(ids)))[0].log_softmax(-1)
    want = [float(logits[p - 1, ids[p]]) for p in range(1, len(ids))]
    scored = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3)
    for engine in (make_engine(model), make_engine(model, max_step_tokens=7)):
        run(engine, [(ids, GREEDY)])  # the prompt's prefix is now cached
        seq, _ = run(engine, [(ids, scored), (prompts(model)[2], GREEDY)])
        assert seq.prompt_logprobs[0] is None and len(seq.prompt_logprobs) == len(ids)
        got = [lp.logprob for lp in seq.prompt_logprobs[1:]]
        assert got == pytest.approx(want, abs=1e-4)
        top = seq.prompt_logprobs[5].top
        assert [t for t, _ in top] == logits[4].topk(3).indices.tolist()


def test_penalties_change_repetitive_output(model: LoadedModel) -> None:
    ids = model.tokenizer.encode("one one one one one one one one")
    plain = run(make_engine(model), [(ids, SamplingParams(max_tokens=8, temperature=0))])[0].output_ids
    penalised = SamplingParams(max_tokens=8, temperature=0, repetition_penalty=1.8, frequency_penalty=1.5)
    other = run(make_engine(model), [(ids, penalised)])[0].output_ids
    assert plain != other
    assert other.count(plain[0]) < plain.count(plain[0])


def test_abort_frees_kv(model: LoadedModel) -> None:
    engine = make_engine(model)
    (seq,) = engine.add(prompts(model)[1], SamplingParams(max_tokens=200, temperature=0))
    for _ in range(3):
        engine.step()
    assert engine.executor.kv.used_tokens > 0
    engine.abort(seq.request_id)
    assert seq.finish_reason == FinishReason.ABORT and engine.executor.kv.used_tokens == 0 and not engine.has_work


def test_requests_that_cannot_fit_are_refused(model: LoadedModel) -> None:
    engine = make_engine(model, max_model_len=64)
    with pytest.raises(ValueError, match="context"):
        engine.add(list(range(10, 70)), SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        engine.add([], SamplingParams())
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add([10**7], SamplingParams())
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
