"""Streaming metrics: every number a user sees is computed here (docs/DESIGN.md section 2).

Per request i with arrival a, rate r (tokens/s) and token generation times g_1..g_L:

    read_1 = g_1;   read_j = max(g_j, read_{j-1} + 1/r)
    stall_j = max(0, g_j - (read_{j-1} + 1/r))            (j >= 2; stall_1 = 0)
    B_j = (j - 1) - #{k < j : read_k <= g_j}               (unread tokens when token j is generated)
    w_j = 1 if B_j <= 0.1 L; (0.2 L - B_j) / (0.1 L) if 0.1 L < B_j < 0.2 L; 0 if B_j >= 0.2 L

QoE (Andes) compares the reader's digested curve A(t) = #{j : read_j <= t} (a staircase whose slope is
capped at r by construction) with the expected curve T(t) = r (t - a - ttft_expected) clipped to [0, L],
integrated exactly over [a, read_L]: QoE = int A / int T, clipped to [0, 1] (1 when nothing was expected
before the stream ended).

A rate-less request (rate None: an agent, a batch job) has a reader that takes each token the moment it exists:
it never stalls, every token weighs 1 and its QoE is 1; what it cares about is its end-to-end latency. `summarize`
reports the streams and the rate-less requests apart as well as together.

`summarize` turns a list of `RequestRecord`s into a flat JSON-ready dict using vLLM `bench serve` field
names where one exists. Requests with no tokens count as failed and are left out of per-request lists.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from tokenflow_jax import reader

DEFAULT_TTFT_EXPECTED_S = 1.0


@dataclass
class RequestRecord:
    """What the engine observed for one request; output length is len(token_times)."""

    request_id: str
    arrival: float
    rate: float | None  # None: the request stated no rate (rate-less)
    prompt_len: int
    token_times: list[float] = field(default_factory=list)
    preemptions_swap: int = 0
    preemptions_recompute: int = 0

    @property
    def output_len(self) -> int:
        return len(self.token_times)

    @property
    def completed(self) -> bool:
        return len(self.token_times) > 0


@dataclass(frozen=True)
class RequestMetrics:
    """Per-request streaming metrics for one completed request (times in seconds)."""

    request_id: str
    output_len: int
    ttft: float
    e2e: float
    tpot: float | None  # None when output_len == 1 (undefined)
    itls: list[float]
    rebuffer_s: float
    stall_count: int
    effective_tokens: float  # sum of token weights w_ij
    qoe: float


def validate_stream(token_times: Sequence[float], rate: float | None, arrival: float | None = None) -> np.ndarray:
    """Return token times as a float array after checking rate (None: rate-less) and ordering; raise ValueError
    otherwise."""
    if rate is not None and not (isinstance(rate, numbers.Real) and math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be a finite number of tokens/s > 0 or None (rate-less), got {rate!r}")
    times = np.asarray(token_times, dtype=np.float64)
    if times.ndim != 1:
        raise ValueError(f"token_times must be one-dimensional, got shape {times.shape}")
    if times.size and not np.all(np.isfinite(times)):
        raise ValueError("token_times must be finite")
    if times.size > 1 and np.any(np.diff(times) < 0):
        bad = int(np.argmax(np.diff(times) < 0)) + 1
        raise ValueError(
            f"token_times must be non-decreasing; token {bad + 1} at {times[bad]} "
            f"precedes token {bad} at {times[bad - 1]}"
        )
    if arrival is not None:
        if not math.isfinite(arrival):
            raise ValueError(f"arrival must be finite, got {arrival!r}")
        if times.size and times[0] < arrival:
            raise ValueError(f"first token at {times[0]} precedes arrival at {arrival}")
    return times


def _reads(times: np.ndarray, rate: float | None) -> np.ndarray:
    if rate is None:  # rate-less: read as it is made
        return times.copy()
    period = 1.0 / rate
    reads = np.empty_like(times)
    previous = None
    for j, generated in enumerate(times.tolist()):  # the recurrence the live tracker runs, token by token
        previous = reads[j] = reader.next_read(previous, generated, period)
    return reads


def _stalls(times: np.ndarray, reads: np.ndarray, rate: float | None) -> np.ndarray:
    out = np.zeros_like(times)
    if times.size > 1 and rate is not None:
        out[1:] = np.maximum(0.0, times[1:] - reader.read_due(reads[:-1], 1.0 / rate))
    return out


def _unread(times: np.ndarray, reads: np.ndarray) -> np.ndarray:
    earlier = np.arange(times.size)  # j - 1 for 1-based j
    # Reads are sorted, so those <= g_j form a prefix; only the first j - 1 of them count.
    read_by_then = np.minimum(np.searchsorted(reads, times, side="right"), earlier)
    return (earlier - read_by_then).astype(np.float64)


def read_times(token_times: Sequence[float], rate: float) -> np.ndarray:
    """Reader's read time of each token: read_j = max(g_j, read_{j-1} + 1/r), read_1 = g_1."""
    return _reads(validate_stream(token_times, rate), rate)


def stalls(token_times: Sequence[float], rate: float) -> np.ndarray:
    """Per-token stall seconds: stall_j = max(0, g_j - (read_{j-1} + 1/r)); stall_1 = 0."""
    times = validate_stream(token_times, rate)
    return _stalls(times, _reads(times, rate), rate)


def unread_at_generation(token_times: Sequence[float], rate: float) -> np.ndarray:
    """B_j = (j - 1) - #{k < j : read_k <= g_j}, the unread buffer (tokens) when token j is generated."""
    times = validate_stream(token_times, rate)
    return _unread(times, _reads(times, rate))


def buffer_weights(unread: np.ndarray, output_len: int) -> np.ndarray:
    """Token weights w_j from buffer sizes B_j with tau1 = 0.1 L and tau2 = 0.2 L."""
    if output_len <= 0:
        return np.zeros_like(np.asarray(unread, dtype=np.float64))
    return reader.token_weights(unread, output_len)


def token_weights(token_times: Sequence[float], rate: float) -> np.ndarray:
    """w_ij for every token of one request (its output length is len(token_times))."""
    return buffer_weights(unread_at_generation(token_times, rate), len(token_times))


def rebuffer_seconds(token_times: Sequence[float], rate: float) -> float:
    """Rebuffer_i: total seconds the reader waited mid-stream."""
    return float(stalls(token_times, rate).sum())


def stall_count(token_times: Sequence[float], rate: float) -> int:
    """Number of tokens the reader had to wait for (stall_j > 0)."""
    return int(np.count_nonzero(stalls(token_times, rate) > 0))


def inter_token_latencies(token_times: Sequence[float]) -> list[float]:
    """Every gap between consecutive tokens (ITLs), in seconds."""
    times = np.asarray(token_times, dtype=np.float64)
    return np.diff(times).tolist()


def time_per_output_token(token_times: Sequence[float]) -> float | None:
    """TPOT = (E2E - TTFT) / (L - 1); None for L <= 1 where it is undefined."""
    if len(token_times) < 2:
        return None
    return (token_times[-1] - token_times[0]) / (len(token_times) - 1)


def _expected_area(arrival: float, rate: float, output_len: int, end: float, ttft_expected: float) -> float:
    """Exact integral over [arrival, end] of T(t) = rate * (t - arrival - ttft_expected) clipped to [0, L]."""
    start = arrival + ttft_expected
    if end <= start:
        return 0.0
    full = start + output_len / rate  # when the expected curve reaches L
    ramp_end = min(end, full)
    area = 0.5 * rate * (ramp_end - start) ** 2
    if end > full:
        area += output_len * (end - full)
    return area


def _qoe(arrival: float, rate: float | None, reads: np.ndarray, ttft_expected: float) -> float:
    if rate is None:
        return 1.0  # no delivery curve was promised
    end = float(reads[-1])
    digested = float(np.sum(end - reads))  # staircase A(t) integrates to sum of (end - read_j)
    expected = _expected_area(arrival, rate, reads.size, end, ttft_expected)
    if expected <= 0.0:
        return 1.0  # stream over before anything was expected: nothing late
    return float(min(1.0, max(0.0, digested / expected)))


def andes_qoe(
    arrival: float, rate: float | None, token_times: Sequence[float], ttft_expected: float = DEFAULT_TTFT_EXPECTED_S
) -> float:
    """Andes QoE in [0, 1]: digested area over expected area on [arrival, last read time]."""
    times = validate_stream(token_times, rate, arrival)
    if times.size == 0:
        raise ValueError("QoE is undefined for a request with no tokens")
    return _qoe(arrival, rate, _reads(times, rate), ttft_expected)


def request_metrics(record: RequestRecord, ttft_expected: float = DEFAULT_TTFT_EXPECTED_S) -> RequestMetrics:
    """All per-request metrics of one completed record, computing the read times once."""
    times = validate_stream(record.token_times, record.rate, record.arrival)
    if times.size == 0:
        raise ValueError(f"request {record.request_id!r} has no tokens (failed); no per-request metrics")
    reads = _reads(times, record.rate)
    per_token_stall = _stalls(times, reads, record.rate)
    return RequestMetrics(
        request_id=record.request_id,
        output_len=int(times.size),
        ttft=float(times[0] - record.arrival),
        e2e=float(times[-1] - record.arrival),
        tpot=time_per_output_token(times.tolist()),
        itls=inter_token_latencies(times),
        rebuffer_s=float(per_token_stall.sum()),
        stall_count=int(np.count_nonzero(per_token_stall > 0)),
        effective_tokens=float(buffer_weights(_unread(times, reads), times.size).sum()),
        qoe=_qoe(record.arrival, record.rate, reads, ttft_expected),
    )


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else 0.0


def _median(values: Sequence[float]) -> float:
    return float(np.median(values)) if len(values) else 0.0


def _std(values: Sequence[float]) -> float:
    return float(np.std(values)) if len(values) else 0.0


def _percentile(values: Sequence[float], q: float) -> float:
    # Linear interpolation, as vLLM's benchmark does; 0 for an empty list like vLLM's `or 0`.
    return float(np.percentile(values, q)) if len(values) else 0.0


def _latency_stats_ms(name: str, seconds: Sequence[float]) -> dict[str, float]:
    ms = [1000.0 * s for s in seconds]
    return {
        f"mean_{name}_ms": _mean(ms),
        f"median_{name}_ms": _median(ms),
        f"std_{name}_ms": _std(ms),
        f"p99_{name}_ms": _percentile(ms, 99),
    }


def summarize(
    records: Iterable[RequestRecord],
    *,
    duration: float | None = None,
    swap_bytes_out: int = 0,
    swap_bytes_in: int = 0,
    scheduler_times_s: Sequence[float] = (),
    ttft_expected: float = DEFAULT_TTFT_EXPECTED_S,
    prefix_cache: tuple[int, int, int] = (0, 0, 0),
) -> dict:
    """Benchmark summary as a flat JSON-ready dict (vLLM `bench serve` names plus TokenFlow's own).

    `duration` defaults to last token time - first arrival; throughputs are 0 when it is not positive.
    Per-request lists (`ttfts`, `itls`, `qoes`, ...) follow `request_ids` and cover completed requests only.
    `prefix_cache`: (queries, hits, host-tier hits) in prompt tokens, as the engine core counts them.
    """
    records = list(records)
    for record in records:
        validate_stream(record.token_times, record.rate, record.arrival)
    done = [r for r in records if r.completed]
    per_request = [request_metrics(r, ttft_expected) for r in done]
    streams = [(r, m) for r, m in zip(done, per_request, strict=True) if r.rate is not None]
    rateless = [m for r, m in zip(done, per_request, strict=True) if r.rate is None]

    if duration is None:
        if done:
            first_arrival = min(r.arrival for r in records)
            duration = max(r.token_times[-1] for r in done) - first_arrival
        else:
            duration = 0.0
    elif not (math.isfinite(duration) and duration >= 0):
        raise ValueError(f"duration must be a finite number of seconds >= 0, got {duration!r}")

    def per_second(total: float) -> float:
        return total / duration if duration > 0 else 0.0

    total_input = sum(r.prompt_len for r in done)
    total_output = sum(m.output_len for m in per_request)
    ttfts = [m.ttft for m in per_request]
    tpots = [m.tpot for m in per_request if m.tpot is not None]
    itls = [m.itls for m in per_request]
    all_itls = [gap for gaps in itls for gap in gaps]
    e2els = [m.e2e for m in per_request]
    rebuffers = [m.rebuffer_s for m in per_request]
    qoes = [m.qoe for m in per_request]
    preempt_swap = sum(r.preemptions_swap for r in records)
    preempt_recompute = sum(r.preemptions_recompute for r in records)
    scheduler_ms = [1000.0 * s for s in scheduler_times_s]

    return {
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration": float(duration),
        "total_input_tokens": int(total_input),
        "total_output_tokens": int(total_output),
        "request_throughput": per_second(len(done)),
        "output_throughput": per_second(total_output),
        "total_token_throughput": per_second(total_input + total_output),
        "effective_throughput": per_second(sum(m.effective_tokens for m in per_request)),
        **_latency_stats_ms("ttft", ttfts),
        **_latency_stats_ms("tpot", tpots),
        **_latency_stats_ms("itl", all_itls),
        **_latency_stats_ms("e2el", e2els),
        "request_ids": [m.request_id for m in per_request],
        "ttfts": ttfts,
        "itls": itls,
        "rebuffer_s": float(sum(rebuffers)),
        "rebuffer_per_request_s": rebuffers,
        "mean_rebuffer_s": _mean(rebuffers),
        "p99_rebuffer_s": _percentile(rebuffers, 99),
        "stall_count": int(sum(m.stall_count for m in per_request)),
        "qoe": _mean(qoes),
        "qoes": qoes,
        "preemptions": int(preempt_swap + preempt_recompute),
        "preemptions_swap": int(preempt_swap),
        "preemptions_recompute": int(preempt_recompute),
        "swap_bytes": int(swap_bytes_out + swap_bytes_in),
        "swap_bytes_out": int(swap_bytes_out),
        "swap_bytes_in": int(swap_bytes_in),
        "mean_scheduler_time_ms": _mean(scheduler_ms),
        "p99_scheduler_time_ms": _percentile(scheduler_ms, 99),
        "prefix_cache_queries": int(prefix_cache[0]),
        "prefix_cache_hits": int(prefix_cache[1]),
        "prefix_cache_host_hits": int(prefix_cache[2]),
        "prefix_cache_hit_rate": prefix_cache[1] / prefix_cache[0] if prefix_cache[0] else 0.0,
        **_by_class(streams, rateless, per_second),
    }


def _by_class(
    streams: Sequence[tuple[RequestRecord, RequestMetrics]],
    rateless: Sequence[RequestMetrics],
    per_second: Callable[[float], float],
) -> dict:
    """The streams' figures (TTFT, rebuffer against their playback time L / r, effective throughput) and the
    rate-less requests' (end-to-end latency, throughput), each over its own completed requests."""
    playback = [m.output_len / r.rate for r, m in streams]
    rebuffers = [m.rebuffer_s for _, m in streams]
    return {
        "stream_completed": len(streams),
        **_latency_stats_ms("stream_ttft", [m.ttft for _, m in streams]),
        "stream_rebuffer_s": float(sum(rebuffers)),
        "stream_playback_s": float(sum(playback)),
        "stream_max_rebuffer_share": max((b / p for b, p in zip(rebuffers, playback, strict=True)), default=0.0),
        "stream_effective_throughput": per_second(sum(m.effective_tokens for _, m in streams)),
        "stream_output_throughput": per_second(sum(m.output_len for _, m in streams)),
        "rateless_completed": len(rateless),
        **_latency_stats_ms("rateless_e2el", [m.e2e for m in rateless]),
        "rateless_output_throughput": per_second(sum(m.output_len for m in rateless)),
    }
