"""Prometheus metrics, in a registry of the app's own (two apps in one process never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "petbreed_http_requests", "HTTP requests by route template, method and status",
            ["route", "method", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "petbreed_http_request_duration_seconds", "HTTP request latency by route template", ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=self.registry,
        )
        self.stages = Histogram(
            "petbreed_stage_duration_seconds", "Time in each stage of a prediction: decode (a request's uploads "
            "to images), and per image render or render_process (image processor and vLLM's placeholders, in "
            "this process or a render process), round1 (the root request), round2 (deeper label-trie nodes, only "
            "for images that need them)", ["stage"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "petbreed_queue_depth", "images admitted and not yet answered", registry=self.registry
        )
        self.rejected = Counter(
            "petbreed_queue_rejections", "requests answered 429 because the queue was full", registry=self.registry
        )
        self.predictions = Counter(
            "petbreed_predictions", "images classified, by adapter NAME@VERSION", ["adapter"], registry=self.registry
        )
        self.uncertain = Counter(
            "petbreed_uncertain_predictions", "images answered `uncertain`, by adapter", ["adapter"],
            registry=self.registry,
        )
        self.adapters = Gauge(
            "petbreed_adapters", "adapter versions by state (loaded, refused)", ["state"], registry=self.registry
        )

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stages.labels(stage).observe(seconds)
