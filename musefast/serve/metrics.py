"""The server's Prometheus metrics (``GET /metrics``), in a registry of their own so that
several apps in one process (tests, Ray replicas) never share or clash over counters."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 300)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth=lambda: 0, in_flight=lambda: 0):
        self.registry = r = CollectorRegistry()
        self.queue_depth = Gauge("musefast_queue_depth", "Images waiting for a place in the batch", registry=r)
        self.queue_depth.set_function(queue_depth)
        self.in_flight = Gauge("musefast_in_flight_images", "Images being decoded", registry=r)
        self.in_flight.set_function(in_flight)
        self.rows = Histogram("musefast_rows_per_forward", "Images advanced per batched forward of a step",
                              buckets=ROW_BUCKETS, registry=r)
        self.step_seconds = Histogram("musefast_step_seconds", "Wall time of one engine step (all in-flight images)",
                                      buckets=STEP_BUCKETS, registry=r)
        self.latency = Histogram("musefast_request_latency_seconds", "Arrival to response of images requests",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("musefast_images", "Images generated (rate() gives images/s)", registry=r)
        self.rejections = Counter("musefast_rejections", "Requests refused or failed, by reason", ["reason"],
                                  registry=r)
        self.requests = Counter("musefast_requests", "Images requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)

    def on_step(self, seconds: float, images: int, forwards: int) -> None:
        self.step_seconds.observe(seconds)
        if forwards:
            self.rows.observe(images / forwards)

    def text(self) -> bytes:
        return generate_latest(self.registry)
