"""Which sequences run in the next step: FCFS, FastServe's skip-join MLFQ, and per-user VTC fairness.

A scheduler only ranks; the engine packs the ranked sequences into a step under its token, sequence and
KV budgets, and preempts (at token granularity) whatever is not picked. Time is passed in, never read,
so the policies are pure and testable in simulation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class SchedState:
    """Per-job bookkeeping the schedulers keep on each job."""

    level: int = 0  # MLFQ queue; 0 is the highest priority
    attained: float = 0.0  # service seconds received in the current level
    queued_since: float = 0.0  # when the job entered its current queue (FCFS order within a level)
    last_served: float = 0.0  # end of the last step the job ran in (or its arrival)


class Job(Protocol):
    arrival: float
    user: str
    sched: SchedState


class Scheduler(ABC):
    name: str

    def admit(self, job: Job, now: float, prefill_estimate: float) -> None:
        """A new job arrives; `prefill_estimate` is its predicted first-step time in seconds."""
        job.sched = SchedState(queued_since=now, last_served=now)

    @abstractmethod
    def rank(self, jobs: Sequence[Job], now: float) -> list[Job]:
        """All unfinished jobs, highest priority first."""

    def charge(self, job: Job, service: float, now: float, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        """`job` ran in a step that took `service` seconds, computing `prompt_tokens` of prefill and
        generating `output_tokens`."""
        job.sched.last_served = now

    def forget(self, job: Job) -> None:  # noqa: B027 - most policies keep no per-job state to drop
        """The job finished or was cancelled."""


class FCFS(Scheduler):
    """First come, first served (vLLM's default): arrival order, running jobs keep their place."""

    name = "fcfs"

    def rank(self, jobs: Sequence[Job], now: float) -> list[Job]:
        return sorted(jobs, key=lambda j: j.arrival)


class SkipJoinMLFQ(Scheduler):
    """FastServe's skip-join multi-level feedback queue.

    Queue i has quantum q0 * 2**i seconds of service. A new job joins the highest queue whose quantum
    covers its estimated prefill time (skipping the levels above, where it would only burn quanta before
    being demoted). A job that uses up its level's quantum drops one level. A job that has waited longer
    than `starvation` seconds is promoted to the top, ahead of jobs that waited less.
    """

    name = "mlfq"

    def __init__(self, base_quantum: float = 0.25, levels: int = 8, starvation: float = 10.0) -> None:
        if base_quantum <= 0 or levels < 1 or starvation <= 0:
            raise ValueError("MLFQ needs a positive quantum, at least one level and a positive starvation bound")
        self.quanta = [base_quantum * 2**i for i in range(levels)]
        self.starvation = starvation

    def admit(self, job: Job, now: float, prefill_estimate: float) -> None:
        super().admit(job, now, prefill_estimate)
        job.sched.level = next((i for i, q in enumerate(self.quanta) if q >= prefill_estimate), len(self.quanta) - 1)

    def rank(self, jobs: Sequence[Job], now: float) -> list[Job]:
        for job in jobs:
            s = job.sched
            if now - s.last_served > self.starvation and (s.level, s.queued_since) != (0, s.last_served):
                # Promote, keeping the time it started waiting so it goes ahead of fresher top-level jobs.
                s.level, s.attained, s.queued_since = 0, 0.0, s.last_served
        return sorted(jobs, key=lambda j: (j.sched.level, j.sched.queued_since, j.arrival))

    def charge(self, job: Job, service: float, now: float, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        s = job.sched
        s.last_served = now
        s.attained += service
        if s.attained >= self.quanta[s.level] and s.level < len(self.quanta) - 1:
            s.level, s.attained, s.queued_since = s.level + 1, 0.0, now


@dataclass
class _UserCounter:
    served: float = 0.0
    active: int = 0


@dataclass
class VTC(Scheduler):
    """Virtual token counters (Sheng et al., OSDI '24) layered on another scheduler.

    Each user's counter grows with the tokens served to them (prompt tokens weigh `input_weight`,
    generated tokens `output_weight`). The ranking interleaves users, always taking the next job of the
    user with the smallest counter (a step's worth of tokens added per pick), each user's jobs in the
    inner scheduler's order. A user who becomes active is lifted to the smallest active counter, so
    idling banks no credit.
    """

    inner: Scheduler
    input_weight: float = 1.0
    output_weight: float = 2.0
    users: dict[str, _UserCounter] = field(default_factory=dict)

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"vtc+{self.inner.name}"

    def admit(self, job: Job, now: float, prefill_estimate: float) -> None:
        self.inner.admit(job, now, prefill_estimate)
        counter = self.users.setdefault(job.user, _UserCounter())
        if counter.active == 0:
            active = [c.served for c in self.users.values() if c.active]
            counter.served = max(counter.served, min(active, default=counter.served))
        counter.active += 1

    def rank(self, jobs: Sequence[Job], now: float) -> list[Job]:
        # One pick costs about one output token; prefill costs are charged when they happen.
        per_user: dict[str, list[Job]] = {}
        for job in self.inner.rank(jobs, now):
            per_user.setdefault(job.user, []).append(job)
        tentative = {u: self.users[u].served if u in self.users else 0.0 for u in per_user}
        ranked: list[Job] = []
        while per_user:
            user = min(per_user, key=lambda u: tentative[u])
            job = per_user[user].pop(0)
            ranked.append(job)
            tentative[user] += self.output_weight
            if not per_user[user]:
                del per_user[user]
        return ranked

    def charge(self, job: Job, service: float, now: float, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        self.inner.charge(job, service, now, prompt_tokens, output_tokens)
        cost = self.input_weight * prompt_tokens + self.output_weight * output_tokens
        self.users.setdefault(job.user, _UserCounter()).served += cost

    def forget(self, job: Job) -> None:
        self.inner.forget(job)
        counter = self.users.get(job.user)
        if counter is not None:
            counter.active = max(0, counter.active - 1)


def make_scheduler(name: str, fair: bool = False, **mlfq: float) -> Scheduler:
    if name == "fcfs":
        base: Scheduler = FCFS()
    elif name == "mlfq":
        base = SkipJoinMLFQ(**mlfq)
    else:
        raise ValueError(f"unknown scheduler {name!r}: choose 'mlfq' or 'fcfs'")
    return VTC(base) if fair else base
