"""The /metrics endpoint: engine state and streaming latencies in Prometheus format, one registry per app.

Gauges and counters are read from `AsyncEngine.stats()` at scrape time (one consistent snapshot); TTFT and
ITL histograms are fed per finished request from `tokenflow_jax.metrics.request_metrics`, the one place
those numbers are computed.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tokenflow_jax.engine.async_engine import AsyncEngine
from tokenflow_jax.metrics import RequestRecord, request_metrics

TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class EngineCollector(Collector):
    """Engine gauges and counters, read from one stats snapshot per scrape."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        s = self.engine.stats()
        yield GaugeMetricFamily("tokenflow_requests_running", "Requests decoding on the device.", value=s.running)
        yield GaugeMetricFamily("tokenflow_requests_waiting", "Requests waiting for (re)admission.", value=s.waiting)
        yield GaugeMetricFamily("tokenflow_requests_paused", "Requests preempted by swap (KV on host).", value=s.paused)
        yield GaugeMetricFamily(
            "tokenflow_requests_unfinished", "Requests accepted and not finished.", value=self.engine.num_unfinished
        )
        used = GaugeMetricFamily("tokenflow_kv_pages_used", "KV cache pages in use per tier.", labels=["tier"])
        used.add_metric(["device"], s.device_pages_used)
        used.add_metric(["host"], s.host_pages_used)
        yield used
        total = GaugeMetricFamily("tokenflow_kv_pages_total", "KV cache pages per tier.", labels=["tier"])
        total.add_metric(["device"], s.device_pages_total)
        total.add_metric(["host"], s.host_pages_total)
        yield total
        preemptions = CounterMetricFamily("tokenflow_preemptions", "Preemptions by mode.", labels=["mode"])
        preemptions.add_metric(["swap"], s.preemptions_swap)
        preemptions.add_metric(["recompute"], s.preemptions_recompute)
        yield preemptions
        yield CounterMetricFamily(
            "tokenflow_rebuffer_seconds", "Seconds streaming readers waited mid-stream (virtual clients).",
            value=s.rebuffer_s,
        )  # fmt: skip
        yield CounterMetricFamily("tokenflow_requests_finished", "Requests the engine finished.",
                                  value=s.finished_requests)  # fmt: skip
        by_reason = CounterMetricFamily("tokenflow_requests_finished_by_reason",
                                        "Finished requests by how they ended: stop, length, abort, error.",
                                        labels=["reason"])  # fmt: skip
        for reason in ("stop", "length", "abort", "error"):
            by_reason.add_metric([reason], dict(s.finished_by_reason).get(reason, 0))
        yield by_reason


class ServingMetrics:
    """The app's Prometheus registry."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine: AsyncEngine) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))
        self.ttft = Histogram("tokenflow_time_to_first_token_seconds", "Time to first token (engine clock).",
                              buckets=TTFT_BUCKETS_S, registry=self.registry)  # fmt: skip
        self.itl = Histogram("tokenflow_inter_token_latency_seconds", "Gap between consecutive tokens.",
                             buckets=ITL_BUCKETS_S, registry=self.registry)  # fmt: skip
        self.http_responses = Counter("tokenflow_http_responses", "HTTP responses by route and status.",
                                      ["route", "status"], registry=self.registry)  # fmt: skip
        engine.add_finish_listener(self.observe_finished)

    def observe_finished(self, record: RequestRecord) -> None:
        if not record.token_times:
            return
        m = request_metrics(record)
        self.ttft.observe(m.ttft)
        for gap in m.itls:
            self.itl.observe(gap)

    def observe_response(self, route: str, status: int) -> None:
        self.http_responses.labels(route, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
