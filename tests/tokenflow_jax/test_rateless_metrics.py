"""Rate-less requests (rate None) in the tracker, the metrics and the workloads: a reader that takes each token
when it is made, figures reported per class, and "none" in a rate mix."""

from __future__ import annotations

import numpy as np
import pytest

from tokenflow_jax.metrics import RequestRecord, summarize
from tokenflow_jax.tracker import RATE, RequestTracker, VirtualBuffer
from tokenflow_jax.workloads import RateMix, burst


def test_a_rateless_buffer_is_always_empty_and_never_stalls() -> None:
    buffer = VirtualBuffer(None, 1.0)
    for t in (1.5, 1.6, 4.0, 9.0):  # long gaps: a stream would stall, nobody reads this one at a pace
        buffer.on_token(t)
    assert buffer.buffer_tokens(9.0) == 0 and buffer.time_until_dry(9.0) == 0.0
    assert buffer.rebuffer_s == 0.0 and buffer.stall_count == 0
    assert buffer.read_times == buffer.token_times
    tracker = RequestTracker()
    tracker.add("a", None, 0.0, prompt_len=3, max_tokens=8)
    tracker.add("s", 20.0, 0.0, prompt_len=3, max_tokens=8)
    assert tracker.column_block(["a", "s"])[RATE].tolist() == [0.0, 20.0]


def _records(seed: int = 3) -> list[RequestRecord]:
    rng = np.random.default_rng(seed)
    records = []
    for i in range(40):
        arrival = float(rng.uniform(0, 2))
        gaps = rng.exponential(0.04, int(rng.integers(5, 30)))
        times = (arrival + float(rng.uniform(0.05, 1.0)) + np.cumsum(gaps)).tolist()
        records.append(RequestRecord(f"r{i}", arrival, None if i % 3 == 0 else 15.0 + i, 8, times))
    return records


def test_summarize_reports_streams_and_rateless_requests_apart() -> None:
    records = _records()
    streams = [r for r in records if r.rate is not None]
    rateless = [r for r in records if r.rate is None]
    both = summarize(records)
    duration = both["duration"]
    alone = summarize(streams, duration=duration)  # the streams by themselves, over the same span
    assert both["stream_completed"] == len(streams) and both["rateless_completed"] == len(rateless)
    for key in ("mean_ttft_ms", "p99_ttft_ms", "median_ttft_ms"):
        assert both[key.replace("ttft", "stream_ttft")] == pytest.approx(alone[key])
    assert both["stream_rebuffer_s"] == pytest.approx(alone["rebuffer_s"])
    assert both["stream_effective_throughput"] == pytest.approx(alone["effective_throughput"])
    assert both["stream_output_throughput"] == pytest.approx(alone["output_throughput"])
    assert both["stream_playback_s"] == pytest.approx(sum(len(r.token_times) / r.rate for r in streams))
    e2e_ms = [1e3 * (r.token_times[-1] - r.arrival) for r in rateless]
    assert both["p99_rateless_e2el_ms"] == pytest.approx(np.percentile(e2e_ms, 99))
    assert both["median_rateless_e2el_ms"] == pytest.approx(np.median(e2e_ms))
    assert both["rateless_output_throughput"] == pytest.approx(sum(len(r.token_times) for r in rateless) / duration)
    # Every rate-less token weighs 1 and none stalls: the totals are the streams' plus the rate-less tokens.
    assert both["rebuffer_s"] == pytest.approx(alone["rebuffer_s"])
    assert both["effective_throughput"] == pytest.approx(alone["effective_throughput"]
                                                         + both["rateless_output_throughput"])  # fmt: skip


def test_a_mix_with_none_draws_rateless_requests_and_keeps_numeric_draws() -> None:
    mix = RateMix.parse("20:0.5,none:0.5")
    assert mix.rates == (20.0, None)
    specs = burst(200, rates=mix, seed=4)
    assert {s.rate for s in specs} == {20.0, None}
    assert 70 <= sum(s.rate is None for s in specs) <= 130
    # A numeric mix draws what drawing from the rates themselves gives (the workloads of earlier figures).
    rng = np.random.default_rng(4)
    numeric = RateMix.parse("15:0.4,20:0.6")
    expected = np.random.default_rng(4).choice(np.asarray([15.0, 20.0]), size=50, p=[0.4, 0.6]).tolist()
    assert numeric.sample(rng, 50) == expected
    assert RateMix.parse("none").rates == (None,)
    with pytest.raises(ValueError, match="rate"):
        RateMix.parse("nope:0.5,20:0.5")
