"""The /metrics endpoint: engine state and streaming latencies in Prometheus format, one registry per app.

Gauges and counters are read from `AsyncEngine.stats()` at scrape time (one consistent snapshot); TTFT and
ITL histograms are fed per finished request from `tokenflow_jax.metrics.request_metrics`, the one place
those numbers are computed. Where vLLM exports the same quantity, it is also exported under vLLM's name
(`vllm:num_requests_running`, `vllm:time_to_first_token_seconds`, ...) with its `model_name` label, so that
dashboards built for vLLM work unchanged. Finished requests are also counted by class (`request_class`: "stream"
for those read at a rate, "rateless" for those that state none), with their end-to-end latency and tokens.
Behind data-parallel replicas (`EngineReplicas`) every unlabelled series is the whole server (summed over the
replicas, as are the vLLM-named ones) and `tokenflow_replica_*` series give each replica (label `replica`).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tokenflow_jax.engine.async_engine import AsyncEngine, EngineStats
from tokenflow_jax.engine.replicas import EngineReplicas
from tokenflow_jax.metrics import RequestRecord, request_metrics

REQUEST_CLASSES = ("stream", "rateless")
TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class EngineCollector(Collector):
    """Engine gauges and counters, read from one stats snapshot per scrape."""

    def __init__(self, engine: AsyncEngine | EngineReplicas, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name

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
        yield GaugeMetricFamily("tokenflow_decode_capacity_tokens_per_second",
                                "Tokens/s the engine's batch can decode (the executor's live estimate).",
                                value=s.decode_capacity_tok_s)  # fmt: skip
        yield from self._vllm_names(s)

    def _vllm_names(self, s: EngineStats) -> Iterator[Metric]:
        """The same snapshot under vLLM's names. vLLM keeps preempted requests in its waiting queue."""
        label = [self.model_name]

        def family(kind: type, name: str, doc: str, value: float) -> Metric:
            metric = kind(name, doc, labels=["model_name"])
            metric.add_metric(label, value)
            return metric

        yield family(GaugeMetricFamily, "vllm:num_requests_running", "Requests decoding on the device.", s.running)
        yield family(GaugeMetricFamily, "vllm:num_requests_waiting", "Requests waiting, paused ones included.",
                     s.waiting + s.paused)  # fmt: skip
        yield family(GaugeMetricFamily, "vllm:num_requests_swapped", "Requests paused with KV on host.", s.paused)
        usage = s.device_pages_used / s.device_pages_total if s.device_pages_total else 0.0
        yield family(GaugeMetricFamily, "vllm:kv_cache_usage_perc", "Device KV pages in use (1 = all).", usage)
        yield family(GaugeMetricFamily, "vllm:gpu_cache_usage_perc", "Device KV pages in use (1 = all).", usage)
        yield family(CounterMetricFamily, "vllm:num_preemptions", "Preemptions (swap and recompute).",
                     s.preemptions_swap + s.preemptions_recompute)  # fmt: skip
        yield family(
            CounterMetricFamily,
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache as requests start.",
            s.prefix_cache_queries,
        )
        yield family(
            CounterMetricFamily,
            "vllm:prefix_cache_hits",
            "Prompt tokens found in the prefix cache (device or host tier).",
            s.prefix_cache_hits,
        )
        yield family(CounterMetricFamily, "tokenflow:prefix_cache_host_hits",
                     "Prompt tokens of prefix-cache hits loaded back from the host tier.",
                     s.prefix_cache_host_hits)  # fmt: skip
        success = CounterMetricFamily("vllm:request_success", "Finished requests by finish reason.",
                                      labels=["model_name", "finished_reason"])  # fmt: skip
        for reason in ("stop", "length", "abort", "error"):
            success.add_metric([self.model_name, reason], dict(s.finished_by_reason).get(reason, 0))
        yield success


class ReplicaCollector(Collector):
    """Each data-parallel replica's series, labelled `replica="i"`: its queues, pages, what the router weighs
    (capacity, its streams' demand) and how many requests it was given."""

    def __init__(self, replicas: EngineReplicas) -> None:
        self.replicas = replicas

    def collect(self) -> Iterator[Metric]:
        def family(kind: type, name: str, doc: str, extra: tuple[str, ...] = ()) -> Metric:
            return kind(f"tokenflow_replica_{name}", doc, labels=["replica", *extra])

        up = family(GaugeMetricFamily, "up", "1 while the replica's engine thread serves, 0 once it died.")
        running = family(GaugeMetricFamily, "requests_running", "Requests decoding on the replica's devices.")
        waiting = family(GaugeMetricFamily, "requests_waiting", "Requests waiting for (re)admission.")
        paused = family(GaugeMetricFamily, "requests_paused", "Requests preempted by swap (KV on host).")
        unfinished = family(GaugeMetricFamily, "requests_unfinished", "Requests routed here and not finished.")
        pages = family(GaugeMetricFamily, "kv_pages_used", "KV cache pages in use per tier.", ("tier",))
        capacity = family(GaugeMetricFamily, "decode_capacity_tokens_per_second",
                          "Tokens/s the replica's batch can decode (the executor's live estimate).")  # fmt: skip
        demand = family(GaugeMetricFamily, "stream_demand_tokens_per_second",
                        "Stated reader rates of the replica's unfinished requests, summed.")  # fmt: skip
        preemptions = family(CounterMetricFamily, "preemptions", "Preemptions by mode.", ("mode",))
        finished = family(CounterMetricFamily, "requests_finished", "Requests the replica finished.")
        routed = family(CounterMetricFamily, "requests_routed", "Requests the router gave the replica.")
        for i, engine in enumerate(self.replicas.replicas):
            s, load, label = engine.stats(), engine.load(), str(i)
            up.add_metric([label], 0 if engine.failure else 1)
            running.add_metric([label], s.running)
            waiting.add_metric([label], s.waiting)
            paused.add_metric([label], s.paused)
            unfinished.add_metric([label], load.num_unfinished)
            pages.add_metric([label, "device"], s.device_pages_used)
            pages.add_metric([label, "host"], s.host_pages_used)
            capacity.add_metric([label], s.decode_capacity_tok_s)  # 0 until it measures a decode step
            demand.add_metric([label], load.stream_demand_tok_s)
            preemptions.add_metric([label, "swap"], s.preemptions_swap)
            preemptions.add_metric([label, "recompute"], s.preemptions_recompute)
            finished.add_metric([label], s.finished_requests)
            routed.add_metric([label], self.replicas.routed[i])
        yield from (up, running, waiting, paused, unfinished, pages, capacity, demand, preemptions, finished, routed)


class ServingMetrics:
    """The app's Prometheus registry."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine: AsyncEngine | EngineReplicas, model_name: str | None = None) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name or engine.llm.model_name
        self.registry.register(EngineCollector(engine, self.model_name))
        if isinstance(engine, EngineReplicas):
            self.registry.register(ReplicaCollector(engine))
        self.ttft = Histogram("tokenflow_time_to_first_token_seconds", "Time to first token (engine clock).",
                              buckets=TTFT_BUCKETS_S, registry=self.registry)  # fmt: skip
        self.itl = Histogram("tokenflow_inter_token_latency_seconds", "Gap between consecutive tokens.",
                             buckets=ITL_BUCKETS_S, registry=self.registry)  # fmt: skip
        self.http_responses = Counter("tokenflow_http_responses", "HTTP responses by route and status.",
                                      ["route", "status"], registry=self.registry)  # fmt: skip
        self.vllm = self._vllm_request_metrics()
        by_class = ["request_class"]
        self.by_class = {
            "finished": Counter("tokenflow_requests_finished_by_class", "Finished requests with tokens, by class.",
                                by_class, registry=self.registry),
            "e2e": Histogram("tokenflow_e2e_request_latency_seconds", "Arrival to last token, by class.", by_class,
                             buckets=TTFT_BUCKETS_S, registry=self.registry),
            "generation": Counter("tokenflow_generation_tokens", "Tokens generated by finished requests, by class.",
                                  by_class, registry=self.registry),
        }  # fmt: skip
        for metric in self.by_class.values():  # both classes show from the start, at 0
            for request_class in REQUEST_CLASSES:
                metric.labels(request_class)
        engine.add_finish_listener(self.observe_finished)

    def _vllm_request_metrics(self) -> dict[str, Histogram | Counter]:
        """vLLM's per-request metrics, fed from the same `request_metrics` as ours (tokens counted at finish)."""
        r, labels = self.registry, ["model_name"]
        return {
            "ttft": Histogram("vllm:time_to_first_token_seconds", "Time to first token (engine clock).", labels,
                              buckets=TTFT_BUCKETS_S, registry=r),
            "itl": Histogram("vllm:inter_token_latency_seconds", "Gap between consecutive tokens.", labels,
                             buckets=ITL_BUCKETS_S, registry=r),
            "tpot": Histogram("vllm:time_per_output_token_seconds", "Gap between consecutive tokens.", labels,
                              buckets=ITL_BUCKETS_S, registry=r),
            "e2e": Histogram("vllm:e2e_request_latency_seconds", "Arrival to last token.", labels,
                             buckets=TTFT_BUCKETS_S, registry=r),
            "prompt": Counter("vllm:prompt_tokens", "Prompt tokens of finished requests.", labels, registry=r),
            "generation": Counter("vllm:generation_tokens", "Tokens generated by finished requests.", labels,
                                  registry=r),
        }  # fmt: skip

    def observe_finished(self, record: RequestRecord) -> None:
        if not record.token_times:
            return
        m = request_metrics(record)
        vllm = {name: metric.labels(self.model_name) for name, metric in self.vllm.items()}
        self.ttft.observe(m.ttft)
        vllm["ttft"].observe(m.ttft)
        vllm["e2e"].observe(m.e2e)
        vllm["prompt"].inc(record.prompt_len)
        vllm["generation"].inc(m.output_len)
        request_class = "rateless" if record.rate is None else "stream"
        self.by_class["finished"].labels(request_class).inc()
        self.by_class["e2e"].labels(request_class).observe(m.e2e)
        self.by_class["generation"].labels(request_class).inc(m.output_len)
        for gap in m.itls:
            self.itl.observe(gap)
            vllm["itl"].observe(gap)
            vllm["tpot"].observe(gap)

    def observe_response(self, route: str, status: int) -> None:
        self.http_responses.labels(route, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
