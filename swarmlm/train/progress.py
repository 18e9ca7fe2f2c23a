"""What a training peer shows: a rich progress bar, one log line per round, and Prometheus metrics."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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

    def observe(self, report: Any) -> None:
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


class TrainProgress:
    """A progress bar over a round's inner steps (round, step, loss, tokens/s, group) plus a log line
    per round, which is what a non-interactive log (or a test) reads."""

    def __init__(self, inner_steps: int, tokens_per_step: int, metrics: TrainMetrics) -> None:
        self.inner_steps, self.tokens_per_step, self.metrics = inner_steps, tokens_per_step, metrics
        self.bar = Progress(
            TextColumn("[bold]round {task.fields[round]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}  {task.fields[tps]:.0f} tok/s  group {task.fields[group]}"),
            TimeElapsedColumn(),
            transient=True,
        )
        self.task = self.bar.add_task("inner", total=inner_steps, round="-", loss=float("nan"), tps=0.0, group="-")
        self.group = "-"
        self._t0 = time.perf_counter()

    def __enter__(self) -> TrainProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def start_round(self, round_: int, rounds: int) -> None:
        self._t0 = time.perf_counter()
        fields = {"round": f"{round_ + 1}/{rounds}", "loss": float("nan"), "tps": 0.0, "group": self.group}
        self.bar.reset(self.task, total=self.inner_steps, **fields)  # reset replaces all fields

    def step(self, i: int, loss: float) -> None:
        tps = i * self.tokens_per_step / max(time.perf_counter() - self._t0, 1e-9)
        self.bar.update(self.task, completed=i, loss=loss, tps=tps)

    def end_round(self, report: Any) -> None:
        self.metrics.observe(report)
        self.group = str(report.group_size) if report.averaged else "-"
        eps = f" epsilon={report.epsilon:.2f}" if report.epsilon is not None else ""
        averaged = f"group={report.group_size}" if report.averaged else "not averaged (no group): progress kept"
        logger.info(
            "round %d: loss=%.4f val_loss=%.4f %s digest=%s sent=%dB util=%.2f%s",
            report.round,
            report.train_loss,
            report.val_loss,
            averaged,
            report.digest[:12],
            report.bytes_sent,
            report.compute_s / max(report.wall_s, 1e-9),
            eps,
        )
