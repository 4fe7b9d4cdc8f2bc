"""The server's Prometheus metrics: requests, steps, the pool's batches, queue latency, streams.

Counters and histograms come from prometheus_client; the pool's own totals, the open streams and
the recent p50/p99 are read when /metrics is scraped.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_RECENT = 8192  # latencies kept for the p50/p99 of recent requests
_WINDOW = 10.0  # seconds over which steps/s and the mean batch are taken

_LATENCY_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Metrics:
    def __init__(self, pool: Any, store: Any = None) -> None:
        self.pool = pool
        self.store = store
        self.registry = CollectorRegistry()
        self.requests = Counter("lstm_engine_requests", "HTTP requests and WebSocket messages answered",
                                ["route", "status"], registry=self.registry)
        self.step_latency = Histogram("lstm_engine_step_queue_seconds",
                                      "Time from a step's submission to the pool to its result (queue and batch)",
                                      buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.request_latency = Histogram("lstm_engine_request_seconds", "Time to answer a step request or message",
                                         buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.counted: dict[tuple[str, int], Any] = {}  # the requests counter's child per (route, status)
        self.recent = np.zeros(_RECENT)
        self.recent_n = 0
        self.samples: deque = deque()  # (time, pool steps, pool batches), for the windowed rates
        self.lock = threading.Lock()
        self.registry.register(self)

    def observe_step(self, seconds: float) -> None:
        self.step_latency.observe(seconds)

    def observe_request(self, route: str, status: int, seconds: float | None) -> None:
        # labels() builds and looks up a key under a lock each call: a few % of a step message.
        child = self.counted.get((route, status))
        if child is None:
            child = self.counted[route, status] = self.requests.labels(route, str(status))
        child.inc()
        if seconds is not None:
            self.request_latency.observe(seconds)
            with self.lock:
                self.recent[self.recent_n % _RECENT] = seconds
                self.recent_n += 1

    def sample(self) -> None:
        """Record the pool's totals now (called every second by the server)."""
        stats = self.pool.stats
        now = time.monotonic()
        with self.lock:
            self.samples.append((now, stats["steps"], stats["batches"]))
            while len(self.samples) > 2 and now - self.samples[0][0] > _WINDOW:
                self.samples.popleft()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self):  # the custom collector: values read at scrape time
        stats = self.pool.stats
        steps = CounterMetricFamily("lstm_engine_pool_steps", "Steps run by the pool")
        steps.add_metric([], stats["steps"])
        batches = CounterMetricFamily("lstm_engine_pool_batches",
                                      "Batches run by the pool (steps/batches = mean batch)")
        batches.add_metric([], stats["batches"])
        yield steps
        yield batches
        with self.lock:
            first = self.samples[0] if self.samples else None
            last = self.samples[-1] if self.samples else None
            n = min(self.recent_n, _RECENT)
            recent = self.recent[:n].copy()
        rate = GaugeMetricFamily("lstm_engine_steps_per_second", f"Pool steps per second over the last {_WINDOW:g} s")
        mean = GaugeMetricFamily("lstm_engine_batch_size_mean", f"Mean pool batch size over the last {_WINDOW:g} s")
        if first is not None and last[0] > first[0]:
            rate.add_metric([], (last[1] - first[1]) / (last[0] - first[0]))
            mean.add_metric([], (last[1] - first[1]) / max(1, last[2] - first[2]))
        else:
            rate.add_metric([], 0.0)
            mean.add_metric([], 0.0)
        yield rate
        yield mean
        quant = GaugeMetricFamily("lstm_engine_request_latency_seconds",
                                  f"Latency of the last {_RECENT} step requests and messages, by quantile",
                                  labels=["quantile"])
        for q in (0.5, 0.99):
            quant.add_metric([str(q)], float(np.quantile(recent, q)) if n else 0.0)
        yield quant
        if self.store is not None:
            streams = GaugeMetricFamily("lstm_engine_streams", "Streams, by where their state is", labels=["where"])
            resident = self.store.resident
            streams.add_metric(["pool"], resident)
            streams.add_metric(["evicted"], len(self.store.entries) - resident)
            yield streams
            ev = CounterMetricFamily("lstm_engine_evictions", "Idle streams moved out of the pool")
            ev.add_metric([], self.store.evictions)
            yield ev
