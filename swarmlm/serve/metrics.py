"""Prometheus metrics, named after vLLM's where they mean the same (with a `swarmlm:` prefix)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from swarmlm.engine.engine import Engine
from swarmlm.engine.sequence import StepOutput

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class ServingMetrics:
    """One registry per server, so several servers (or tests) in one process do not collide. Every series
    carries the `model_name` label, bound once here."""

    def __init__(self, model_id: str) -> None:
        self.registry = r = CollectorRegistry()
        self.model_id = model_id
        labels = ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"swarmlm:{name}", doc, labels, registry=r).labels(model_id)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"swarmlm:{name}", doc, labels, registry=r).labels(model_id)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(f"swarmlm:{name}", doc, labels, buckets=_LATENCY_BUCKETS, registry=r).labels(model_id)

        self.running = gauge("num_requests_running", "Sequences in the engine that have been scheduled")
        self.waiting = gauge("num_requests_waiting", "Requests queued, not yet scheduled")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of the KV budget in use (0-1)")
        self.prefix_hits = gauge("prefix_cache_hits", "Prompt tokens served from the prefix cache")
        self.prefix_queries = gauge("prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
        self.preemptions = gauge("num_preemptions", "Sequences whose KV was evicted to make room")
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token")
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive tokens")
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token")
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to first scheduled step")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed")
        self.generation_tokens = counter("generation_tokens", "Tokens generated")
        self.rejected = counter("request_rejected", "Requests refused with 429 (queue full)")
        self.failover_recovery = histogram(
            "swarm_failover_recovery_seconds", "A failed hop seen -> its step answered by a replacement chain"
        )
        self.generated = 0  # tokens generated so far, readable without Prometheus internals (dashboard)
        self.success = Counter(
            "swarmlm:request_success", "Finished sequences by finish reason", [*labels, "finished_reason"], registry=r
        )

    def observe_output(self, out: StepOutput) -> None:
        """Called on the engine thread for every sequence output."""
        seq = out.seq
        if out.token_id is not None:
            self.generation_tokens.inc()
            self.generated += 1
            if len(seq.output_ids) == 1:
                self.ttft.observe(seq.first_token - seq.arrival)
                self.prompt_tokens.inc(len(seq.prompt_ids))
            elif out.inter_token is not None:
                self.itl.observe(out.inter_token)
        if seq.finished:
            self.success.labels(self.model_id, seq.finish_reason.value).inc()
            if seq.first_scheduled is not None:
                self.queue_time.observe(seq.first_scheduled - seq.arrival)
            self.e2e.observe(seq.finished_at - seq.arrival)

    def observe_step(self, engine: Engine) -> None:
        self.running.set(sum(1 for s in engine.active if s.first_scheduled is not None))
        executor = engine.executor
        self.kv_usage.set(executor.kv_usage)
        self.prefix_hits.set(executor.prefix_hits)
        self.prefix_queries.set(executor.prefix_queries)
        self.preemptions.set(executor.preemptions)
