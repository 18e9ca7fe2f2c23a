"""Scheduler policies, checked in a discrete-event simulation of an engine with a batch capacity.

The schedulers are pure (time is passed in), so they are exercised here directly; the engine tests and
the API tests run them on the real model.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from swarmlm.engine.scheduler import FCFS, VTC, SchedState, Scheduler, SkipJoinMLFQ

PREFILL_PER_TOKEN = 0.001
DECODE_STEP = 0.05


@dataclass(eq=False)
class Job:
    arrival: float
    prompt: int
    output: int
    user: str = "u"
    sched: SchedState = field(default_factory=SchedState)
    generated: int = 0
    served_at: list[float] = field(default_factory=list)
    done_at: float | None = None


def simulate(scheduler: Scheduler, jobs: list[Job], capacity: int, max_steps: int = 100_000) -> float:
    """Run until every job is done; returns the end time. A step serves the top `capacity` jobs: a job's
    first step is its prefill (and first token), later steps one token each."""
    now, pending, active = 0.0, sorted(jobs, key=lambda j: j.arrival), []
    for _ in range(max_steps):
        while pending and pending[0].arrival <= now:
            job = pending.pop(0)
            scheduler.admit(job, job.arrival, PREFILL_PER_TOKEN * job.prompt)
            active.append(job)
        if not active:
            if not pending:
                return now
            now = pending[0].arrival
            continue
        batch = scheduler.rank(active, now)[:capacity]
        prefill = sum(j.prompt for j in batch if j.generated == 0)
        step = DECODE_STEP + PREFILL_PER_TOKEN * prefill
        for job in batch:
            job.served_at.append(now)
        now += step
        for job in batch:
            first = job.generated == 0
            job.generated += 1
            scheduler.charge(job, step, now, prompt_tokens=job.prompt if first else 0, output_tokens=1)
            if job.generated == job.output:
                job.done_at = now
                active.remove(job)
                scheduler.forget(job)
    raise AssertionError("simulation did not finish")


job_lists = st.lists(
    st.builds(Job, arrival=st.floats(0, 5), prompt=st.integers(1, 800), output=st.integers(1, 120)),
    min_size=1,
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(jobs=job_lists, capacity=st.integers(1, 4), which=st.sampled_from(["fcfs", "mlfq", "vtc"]))
def test_every_admitted_job_finishes(jobs: list[Job], capacity: int, which: str) -> None:
    scheduler = {"fcfs": FCFS(), "mlfq": SkipJoinMLFQ(0.1), "vtc": VTC(SkipJoinMLFQ(0.1))}[which]
    for i, job in enumerate(jobs):
        job.user = f"user{i % 3}"
    simulate(scheduler, jobs, capacity)
    assert all(j.done_at is not None and j.generated == j.output for j in jobs)


@settings(max_examples=60, deadline=None)
@given(jobs=job_lists, capacity=st.integers(1, 3))
def test_no_job_waits_beyond_the_starvation_bound(jobs: list[Job], capacity: int) -> None:
    quantum, starvation = 0.1, 1.0
    simulate(SkipJoinMLFQ(quantum, starvation=starvation), jobs, capacity)
    longest_step = DECODE_STEP + PREFILL_PER_TOKEN * sum(sorted(j.prompt for j in jobs)[-capacity:])
    # A starving job is promoted ahead of everything that waited less; only jobs that starved earlier
    # (at most all others, served `capacity` per step) and one quantum of top-level service come first.
    bound = starvation + quantum + math.ceil(len(jobs) / capacity) * longest_step
    for job in jobs:
        times = [job.arrival, *job.served_at]
        waits = [b - a - (longest_step if i else 0) for i, (a, b) in enumerate(itertools.pairwise(times))]
        assert max(waits) <= bound, (job, max(waits), bound)


@settings(max_examples=40, deadline=None)
@given(long_output=st.integers(60, 400), short_output=st.integers(1, 8), shorts=st.integers(1, 5))
def test_mlfq_serves_short_jobs_first(long_output: int, short_output: int, shorts: int) -> None:
    def scenario() -> tuple[Job, list[Job]]:
        long = Job(0.0, prompt=32, output=long_output)
        return long, [Job(0.5 + 0.01 * i, prompt=32, output=short_output) for i in range(shorts)]

    long_f, shorts_f = scenario()
    simulate(FCFS(), [long_f, *shorts_f], capacity=1)
    long_m, shorts_m = scenario()
    simulate(SkipJoinMLFQ(0.2, starvation=1000), [long_m, *shorts_m], capacity=1)
    assert all(s.done_at > long_f.done_at for s in shorts_f)  # FCFS: stuck behind the long job
    assert all(s.done_at < long_m.done_at for s in shorts_m)  # MLFQ: preempts it
    mean = lambda js: sum(j.done_at - j.arrival for j in js) / len(js)  # noqa: E731
    assert mean([long_m, *shorts_m]) < mean([long_f, *shorts_f])


def test_skip_join_enters_the_level_its_prefill_needs() -> None:
    mlfq = SkipJoinMLFQ(base_quantum=0.1, levels=6)
    levels = []
    for prefill in (0.05, 0.1, 0.15, 0.35, 100.0):
        job = Job(0.0, 1, 1)
        mlfq.admit(job, 0.0, prefill)
        levels.append(job.sched.level)
    assert levels == [0, 0, 1, 2, 5]


def test_quantum_exhaustion_demotes_one_level() -> None:
    mlfq = SkipJoinMLFQ(base_quantum=0.1)
    job = Job(0.0, 1, 100)
    mlfq.admit(job, 0.0, 0.0)
    mlfq.charge(job, 0.06, 0.06)
    assert job.sched.level == 0
    mlfq.charge(job, 0.06, 0.12)
    assert (job.sched.level, job.sched.attained) == (1, 0.0)


def test_vtc_keeps_a_light_user_responsive_next_to_a_heavy_one() -> None:
    def run(scheduler: Scheduler) -> Job:
        heavy = [Job(0.0, prompt=64, output=40, user="heavy") for _ in range(12)]
        light = Job(1.0, prompt=64, output=10, user="light")
        simulate(scheduler, [*heavy, light], capacity=2)
        return light

    fair, unfair = run(VTC(FCFS())), run(FCFS())
    assert fair.done_at - fair.arrival < 1.5  # served right away: ~10 steps of 50 ms
    assert unfair.done_at - unfair.arrival > 5 * (fair.done_at - fair.arrival)


def test_vtc_shares_service_between_backlogged_users() -> None:
    vtc = VTC(FCFS())
    jobs = [Job(0.0, prompt=16, output=30, user="a") for _ in range(10)]
    jobs += [Job(0.0, prompt=16, output=30, user="b") for _ in range(3)]
    simulate(vtc, jobs, capacity=2)
    b_done = max(j.done_at for j in jobs if j.user == "b")
    a_tokens_then = sum(min(j.output, sum(t < b_done for t in j.served_at)) for j in jobs if j.user == "a")
    assert abs(a_tokens_then - 90) <= 30  # while b was backlogged, a got about the same service
