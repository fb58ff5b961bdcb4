"""Prometheus metrics, on a registry per app so that tests can run several gateways."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lowvram_requests",
            "Requests answered, by endpoint and status code.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lowvram_request_duration_seconds",
            "Time from request to last byte.",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "lowvram_time_to_first_token_seconds",
            "Time from request to the first streamed token.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "lowvram_tokens",
            "Tokens processed, by kind (prompt, completion).",
            ["kind"],
            registry=self.registry,
        )
        self.chunks = Counter(
            "lowvram_stream_chunks",
            "SSE chunks relayed from the engine.",
            registry=self.registry,
        )
        self.inflight = Gauge(
            "lowvram_inflight_requests", "Requests at the engine.", registry=self.registry
        )
        self.queued = Gauge(
            "lowvram_queued_requests", "Requests waiting for a slot.", registry=self.registry
        )
        self.inflight_limit = Gauge(
            "lowvram_inflight_limit",
            "Requests the gateway sends the engine at once (its planned sequences by default).",
            registry=self.registry,
        )
        self.engine_sequences = Gauge(
            "lowvram_engine_max_sequences",
            "Sequences the engine's plan runs at once (0: the engine did not say).",
            registry=self.registry,
        )
        self.engine_ready = Gauge(
            "lowvram_engine_ready", "1 while the engine is ready.", registry=self.registry
        )
        self.model_state = Gauge(
            "lowvram_model_state",
            "1 for each served model's state, where an engine serves several (llama.cpp's "
            "router: loaded, loading, unloaded, failed).",
            ["model", "state"],
            registry=self.registry,
        )
        self.model_swaps = Counter(
            "lowvram_model_swaps",
            "Swaps between models on one GPU (vLLM's sleep mode), by the model woken.",
            ["model"],
            registry=self.registry,
        )
        self.model_swap_seconds = Histogram(
            "lowvram_model_swap_seconds",
            "Time from the start of a swap (drain, sleep) to the woken model serving.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.swap_wait_seconds = Histogram(
            "lowvram_swap_wait_seconds",
            "Time a request waited for its model to be woken (zero when it was awake).",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.replica_ready = Gauge(
            "lowvram_replica_ready",
            "1 while this engine of the pool is ready.",
            ["replica"],
            registry=self.registry,
        )
        self.replica_outstanding = Gauge(
            "lowvram_replica_outstanding_requests",
            "Requests this engine of the pool is answering.",
            ["replica"],
            registry=self.registry,
        )
        self.engine_state_changes = Counter(
            "lowvram_engine_state_changes",
            "Engine state transitions, by new state.",
            ["state"],
            registry=self.registry,
        )
        self._children: dict[tuple[object, ...], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, cached: the lookup costs more than the update."""
        key = (id(metric), *labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found
