"""The server's Prometheus metrics: requests, steps, the pool's batches, queue latency, streams.

Requests only note what happened (a list append); the notes are counted into the request counters,
the latency histograms and the recent p50/p99 in bulk, every second and at each scrape: through
prometheus_client's Counter and Histogram, with a lock each, they cost ~6 % of a one-step WebSocket
message (py-spy, 200 streams). The pool's own totals and the open streams are read at the scrape.
Everything here runs on the event loop's thread.
"""
from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

_RECENT = 8192  # latencies kept for the p50/p99 of recent requests
_WINDOW = 10.0  # seconds over which steps/s and the mean batch are taken

_LATENCY_BUCKETS = np.array([1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0])


class _Histogram:
    """Latencies noted one by one, counted into Prometheus buckets (upper bounds, inclusive) in bulk."""

    def __init__(self, name: str, doc: str) -> None:
        self.name, self.doc = name, doc
        self.noted: list[float] = []
        self.counts = np.zeros(len(_LATENCY_BUCKETS) + 1, np.int64)  # the last: above every bound
        self.sum = 0.0

    def fold(self) -> np.ndarray:
        """Count the noted latencies; returns them."""
        noted, self.noted = np.asarray(self.noted, np.float64), []
        if len(noted):
            self.counts += np.bincount(np.searchsorted(_LATENCY_BUCKETS, noted), minlength=len(self.counts))
            self.sum += float(noted.sum())
        return noted

    def family(self) -> HistogramMetricFamily:
        cumulative = np.cumsum(self.counts)
        buckets = [(repr(float(b)), int(c)) for b, c in zip(_LATENCY_BUCKETS, cumulative)]
        return HistogramMetricFamily(self.name, self.doc, buckets=buckets + [("+Inf", int(cumulative[-1]))],
                                     sum_value=self.sum)


class Metrics:
    def __init__(self, pool: Any, store: Any = None) -> None:
        self.pool = pool
        self.store = store
        self.registry = CollectorRegistry()
        self.noted_requests: list[tuple[str, int]] = []
        self.requests: Counter = Counter()  # (route, status) -> answered
        self.step_latency = _Histogram("lstm_engine_step_queue_seconds",
                                       "Time from a step's submission to the pool to its result (queue and batch)")
        self.request_latency = _Histogram("lstm_engine_request_seconds", "Time to answer a step request or message")
        self.recent = np.zeros(_RECENT)
        self.recent_n = 0
        self.samples: deque = deque()  # (time, pool steps, pool batches), for the windowed rates
        self.registry.register(self)

    def observe_step(self, seconds: float) -> None:
        self.step_latency.noted.append(seconds)

    def observe_request(self, route: str, status: int, seconds: float | None) -> None:
        self.noted_requests.append((route, status))
        if seconds is not None:
            self.request_latency.noted.append(seconds)

    def fold(self) -> None:
        """Count what the requests noted."""
        noted, self.noted_requests = self.noted_requests, []
        self.requests.update(noted)
        self.step_latency.fold()
        latest = self.request_latency.fold()[-_RECENT:]
        at = np.arange(self.recent_n, self.recent_n + len(latest)) % _RECENT
        self.recent[at] = latest
        self.recent_n += len(latest)

    def sample(self) -> None:
        """Record the pool's totals now and count the notes (called every second by the server)."""
        self.fold()
        stats = self.pool.stats
        now = time.monotonic()
        self.samples.append((now, stats["steps"], stats["batches"]))
        while len(self.samples) > 2 and now - self.samples[0][0] > _WINDOW:
            self.samples.popleft()

    def render(self) -> bytes:
        self.fold()
        return generate_latest(self.registry)

    def collect(self):  # the custom collector: values read at scrape time
        requests = CounterMetricFamily("lstm_engine_requests", "HTTP requests and WebSocket messages answered",
                                       labels=["route", "status"])
        for (route, status), n in sorted(self.requests.items()):
            requests.add_metric([route, str(status)], n)
        yield requests
        yield self.step_latency.family()
        yield self.request_latency.family()
        stats = self.pool.stats
        steps = CounterMetricFamily("lstm_engine_pool_steps", "Steps run by the pool")
        steps.add_metric([], stats["steps"])
        batches = CounterMetricFamily("lstm_engine_pool_batches",
                                      "Batches run by the pool (steps/batches = mean batch)")
        batches.add_metric([], stats["batches"])
        yield steps
        yield batches
        first = self.samples[0] if self.samples else None
        last = self.samples[-1] if self.samples else None
        n = min(self.recent_n, _RECENT)
        recent = self.recent[:n]
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
