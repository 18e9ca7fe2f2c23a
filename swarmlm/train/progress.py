"""What a training peer shows: a rich progress bar (rounds done of the run's total, the current round's
inner steps, an ETA), one log line per round, a summary at the end, and Prometheus metrics."""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import TextIO

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from swarmlm.train.round_report import RoundReport

logger = logging.getLogger(__name__)


class TrainMetrics:
    """Prometheus gauges for one training peer (`--metrics-port`), in their own registry."""

    def __init__(self, port: int | None) -> None:
        self.registry = CollectorRegistry()

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"swarmlm:train_{name}", doc, registry=self.registry)

        self.round = gauge("round", "Global DiLoCo round reached")
        self.loss = gauge("loss", "Mean training loss of the last round")
        self.val_loss = gauge("val_loss", "Validation loss after the last round")
        self.tokens_per_second = gauge("tokens_per_second", "Training tokens per second of wall time")
        self.group_size = gauge("group_size", "Peers in the last round's averaging group")
        self.utilization = gauge("compute_utilization", "Compute time / wall time of the last round")
        self.epsilon = gauge("dp_epsilon", "Differential privacy epsilon spent so far (when DP is on)")
        self.bytes_sent = Counter("swarmlm:train_bytes_sent", "Bytes sent by all-reduce", registry=self.registry)
        if port is not None:
            start_http_server(port, registry=self.registry)

    def observe(self, report: RoundReport) -> None:
        self.round.set(report.round)
        self.loss.set(report.train_loss)
        if not math.isnan(report.val_loss):
            self.val_loss.set(report.val_loss)
        self.tokens_per_second.set(report.tokens / max(report.wall_s, 1e-9))
        self.group_size.set(report.group_size)
        self.utilization.set(report.compute_s / max(report.wall_s, 1e-9))
        if report.epsilon is not None:
            self.epsilon.set(report.epsilon)
        self.bytes_sent.inc(report.bytes_sent)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class TrainProgress:
    """A progress bar over a round's inner steps (rounds done of the total, step, loss, tokens/s, group,
    ETA of the run) plus a log line per round, which is what a non-interactive log (or a test) reads.
    On a terminal, log lines go through the bar's console so they print above it instead of through it."""

    def __init__(self, inner_steps: int, tokens_per_step: int, metrics: TrainMetrics) -> None:
        self.inner_steps, self.tokens_per_step, self.metrics = inner_steps, tokens_per_step, metrics
        self.bar = Progress(
            TextColumn("[bold]rounds {task.fields[done]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}  {task.fields[tps]:.0f} tok/s  group {task.fields[group]}"),
            TimeElapsedColumn(),
            TextColumn("ETA {task.fields[eta]}"),
            transient=True,
        )
        fields = {"done": "-", "loss": float("nan"), "tps": 0.0, "group": "-", "eta": "-"}
        self.task = self.bar.add_task("inner", total=inner_steps, **fields)
        self.group = "-"
        self._t0 = time.perf_counter()
        self._run_t0, self._first_round, self._round, self._rounds = self._t0, 0, 0, 0
        self._streams: list[tuple[logging.StreamHandler[TextIO], TextIO]] = []

    def __enter__(self) -> TrainProgress:
        self.bar.__enter__()
        if self.bar.console.is_terminal:  # sys.stderr is now the bar's proxy, which prints above the bar
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.__stderr__, sys.__stdout__):
                    self._streams.append((handler, handler.setStream(sys.stderr)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handler, stream in self._streams:
            handler.setStream(stream)
        self._streams.clear()
        self.bar.__exit__(*exc)

    def start_run(self, round_: int, rounds: int) -> None:
        """The run's rounds start (after any wait for peers): the ETA counts from here."""
        self._run_t0, self._first_round = time.perf_counter(), round_

    def start_round(self, round_: int, rounds: int) -> None:
        self._t0, self._round, self._rounds = time.perf_counter(), round_, rounds
        fields = {
            "done": f"{round_}/{rounds}",
            "loss": float("nan"),
            "tps": 0.0,
            "group": self.group,
            "eta": self._eta(0),
        }
        self.bar.reset(self.task, total=self.inner_steps, **fields)  # reset replaces all fields

    def _eta(self, step: int) -> str:
        """The run's remaining time at its pace so far (rounds' averaging included)."""
        done = (self._round - self._first_round) * self.inner_steps + step
        left = (self._rounds - self._round) * self.inner_steps - step
        return _duration((time.perf_counter() - self._run_t0) * left / done) if done else "-"

    def step(self, i: int, loss: float) -> None:
        tps = i * self.tokens_per_step / max(time.perf_counter() - self._t0, 1e-9)
        self.bar.update(self.task, completed=i, loss=loss, tps=tps, eta=self._eta(i))

    def end_round(self, report: RoundReport) -> None:
        self.metrics.observe(report)
        self.group = str(report.group_size) if report.averaged else "-"
        eps = f" epsilon={report.epsilon:.2f}" if report.epsilon is not None else ""
        averaged = f"group={report.group_size}" if report.averaged else "not averaged (no group): progress kept"
        logger.info(
            "round %d/%d: loss=%.4f val_loss=%.4f %s digest=%s sent=%dB util=%.2f%s eta=%s",
            report.round,
            self._rounds,
            report.train_loss,
            report.val_loss,
            averaged,
            report.digest[:12],
            report.bytes_sent,
            report.compute_s / max(report.wall_s, 1e-9),
            eps,
            self._eta(self.inner_steps),
        )


def run_summary(
    reports: list[RoundReport],
    round_: int,
    rounds: int,
    last: tuple[int, float, Path] | None,
    best: tuple[int, float] | None,
) -> str:
    """The line a run ends with: where it got, how good the weights are, what it cost this peer."""
    averaged = sum(r.averaged for r in reports if r.tokens)
    tokens = sum(r.tokens for r in reports)
    sent = sum(r.bytes_sent for r in reports)
    final = f"val_loss={last[1]:.4f}" if last is not None else "val_loss=-"
    best_text = f"best={best[1]:.4f} (round {best[0]})" if best is not None else "best=-"
    checkpoint = str(last[2]) if last is not None else "none"
    return (
        f"swarmlm train: done: round {round_}/{rounds} ({averaged} averaged by this peer), {final} {best_text}, "
        f"{tokens:,} tokens trained here, {sent / 1e6:.2f} MB sent; checkpoint {checkpoint}"
    )
