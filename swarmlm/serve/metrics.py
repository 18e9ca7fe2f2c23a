"""Prometheus metrics, named after vLLM's where they mean the same (with a `swarmlm:` prefix)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from swarmlm.engine.engine import Engine, StepOutput

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class ServingMetrics:
    """One registry per server, so several servers (or tests) in one process do not collide."""

    def __init__(self, model_id: str) -> None:
        self.registry = r = CollectorRegistry()
        labels = ["model_name"]
        self.model_id = model_id
        self.running = Gauge(
            "swarmlm:num_requests_running", "Sequences in the engine that have been scheduled", labels, registry=r
        )
        self.waiting = Gauge("swarmlm:num_requests_waiting", "Requests queued, not yet scheduled", labels, registry=r)
        self.kv_usage = Gauge(
            "swarmlm:kv_cache_usage_perc", "Fraction of the KV budget in use (0-1)", labels, registry=r
        )
        self.ttft = Histogram(
            "swarmlm:time_to_first_token_seconds", "Time to first token", labels, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "swarmlm:inter_token_latency_seconds",
            "Time between consecutive tokens",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "swarmlm:e2e_request_latency_seconds", "Arrival to last token", labels, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_time = Histogram(
            "swarmlm:request_queue_time_seconds",
            "Arrival to first scheduled step",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("swarmlm:prompt_tokens", "Prompt tokens processed", labels, registry=r)
        self.generation_tokens = Counter("swarmlm:generation_tokens", "Tokens generated", labels, registry=r)
        self.prefix_hits = Gauge(
            "swarmlm:prefix_cache_hits", "Prompt tokens served from the prefix cache", labels, registry=r
        )
        self.prefix_queries = Gauge(
            "swarmlm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", labels, registry=r
        )
        self.preemptions = Gauge(
            "swarmlm:num_preemptions", "Sequences whose KV was evicted to make room", labels, registry=r
        )
        self.success = Counter(
            "swarmlm:request_success", "Finished sequences by finish reason", [*labels, "finished_reason"], registry=r
        )
        self.rejected = Counter(
            "swarmlm:request_rejected", "Requests refused with 429 (queue full)", labels, registry=r
        )

    def observe_output(self, out: StepOutput) -> None:
        """Called on the engine thread for every sequence output."""
        seq, m = out.seq, self.model_id
        if out.token_id is not None:
            self.generation_tokens.labels(m).inc()
            if len(seq.output_ids) == 1:
                self.ttft.labels(m).observe(seq.first_token - seq.arrival)
                self.prompt_tokens.labels(m).inc(len(seq.prompt_ids))
            elif out.inter_token is not None:
                self.itl.labels(m).observe(out.inter_token)
        if seq.finished:
            self.success.labels(m, seq.finish_reason.value).inc()
            if seq.first_scheduled is not None:
                self.queue_time.labels(m).observe(seq.first_scheduled - seq.arrival)
            self.e2e.labels(m).observe(seq.finished_at - seq.arrival)

    def observe_step(self, engine: Engine) -> None:
        m = self.model_id
        running = sum(1 for s in engine.active if s.first_scheduled is not None)
        self.running.labels(m).set(running)
        self.kv_usage.labels(m).set(engine.kv.usage)
        self.prefix_hits.labels(m).set(engine.kv.prefix_hits)
        self.prefix_queries.labels(m).set(engine.kv.prefix_queries)
        self.preemptions.labels(m).set(engine.preemptions)
