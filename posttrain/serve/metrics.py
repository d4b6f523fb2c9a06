"""``/metrics`` of ``posttrain serve`` in Prometheus' text format (prometheus_client): requests, tokens, the queue,
adapter residency and traffic, time to first token and request latency. Engine and registry counters are read at
scrape time (collectors), so they are never a second copy that could drift."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from posttrain.serve.adapters import AdapterRegistry
from posttrain.serve.engine import Engine
from posttrain.serve.request import RequestHandle

# Seconds: from tens of milliseconds (a short answer on a small model) to a minute (a long one under load).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    def __init__(self, engine: Engine, registry: AdapterRegistry) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()  # this server's own, not the process-global default
        self.requests = Counter(
            "posttrain_requests", "Requests answered, by outcome", ["outcome"], registry=self.registry
        )
        self.first_token = Histogram(
            "posttrain_time_to_first_token_seconds",
            "From submission to the first token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.latency = Histogram(
            "posttrain_request_latency_seconds",
            "From submission to the last token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(engine, registry))

    def finished(self, handle: RequestHandle) -> None:
        self.requests.labels("finished").inc()
        if handle.first_token_at is not None:
            self.first_token.observe(handle.first_token_at - handle.submitted_at)
        if handle.finished_at is not None:
            self.latency.observe(handle.finished_at - handle.submitted_at)

    def cancelled(self) -> None:
        self.requests.labels("cancelled").inc()

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineCollector:
    """The engine's and the adapter registry's own counters, read at each scrape."""

    def __init__(self, engine: Engine, registry: AdapterRegistry) -> None:
        self.engine, self.adapters = engine, registry

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats, counters = self.engine.stats, self.adapters.counters
        yield GaugeMetricFamily("posttrain_queue_length", "Requests waiting for a slot", value=stats.waiting)
        yield GaugeMetricFamily("posttrain_running_rows", "Choices being decoded", value=stats.running_rows)
        yield CounterMetricFamily("posttrain_prompt_tokens", "Prompt tokens admitted", value=stats.prompt_tokens)
        yield CounterMetricFamily("posttrain_generated_tokens", "Tokens generated", value=stats.generated_tokens)
        yield CounterMetricFamily("posttrain_decode_steps", "Batched decoding steps", value=stats.decode_steps)
        yield GaugeMetricFamily(
            "posttrain_adapters_resident", "LoRA adapters in memory", value=len(self.adapters.adapters())
        )
        yield CounterMetricFamily("posttrain_adapter_hits", "Requests whose adapter was resident", value=counters.hits)
        yield CounterMetricFamily(
            "posttrain_adapter_misses", "Requests that loaded their adapter", value=counters.misses
        )
        yield CounterMetricFamily(
            "posttrain_adapter_evictions", "Adapters evicted by the LRU", value=counters.evictions
        )
