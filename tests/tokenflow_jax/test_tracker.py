"""Virtual client buffers: hand cases and agreement with the metrics module on random streams."""

from __future__ import annotations

import bisect
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenflow_jax import metrics
from tokenflow_jax.tracker import RequestTracker, VirtualBuffer


def test_buffer_by_hand():
    buffer = VirtualBuffer(rate=2.0, arrival=0.0)
    assert buffer.buffer_tokens(0.0) == 0 and buffer.time_until_dry(0.0) == 0.0
    assert buffer.first_token_time is None and buffer.last_read_time is None
    for t in (0.0, 0.1, 0.2):
        buffer.on_token(t)
    # reads at 0, 0.5, 1.0: at 0.2 two tokens are unread and the reader runs dry at 1.0
    assert buffer.buffer_tokens(0.2) == 2
    assert buffer.buffer_seconds(0.2) == pytest.approx(1.0)
    assert buffer.time_until_dry(0.2) == pytest.approx(0.8)
    assert buffer.buffer_tokens(0.6) == 1 and buffer.time_until_dry(0.6) == pytest.approx(0.4)
    assert buffer.buffer_tokens(1.5) == 0 and buffer.time_until_dry(1.5) == 0.0
    buffer.on_token(2.0)  # reader waited from 1.5 to 2.0
    assert buffer.read_times == [0.0, 0.5, 1.0, 2.0]
    assert buffer.rebuffer_s == pytest.approx(0.5) and buffer.stall_count == 1
    assert buffer.num_generated == 4 and buffer.first_token_time == 0.0
    assert buffer.token_times == [0.0, 0.1, 0.2, 2.0]
    assert buffer.buffer_tokens(2.0) == 0


@pytest.mark.parametrize("rate", [0, -1.0, float("nan"), float("inf")])
def test_bad_rate_is_rejected(rate):
    with pytest.raises(ValueError, match="rate"):
        VirtualBuffer(rate, 0.0)


def test_out_of_order_tokens_are_rejected():
    buffer = VirtualBuffer(1.0, arrival=1.0)
    with pytest.raises(ValueError, match="precedes arrival"):
        buffer.on_token(0.5)
    buffer.on_token(2.0)
    with pytest.raises(ValueError, match="precedes the previous token"):
        buffer.on_token(1.5)


def test_request_tracker():
    tracker = RequestTracker()
    tracker.add("a", 10.0, 0.0, prompt_len=3, max_tokens=40)
    tracker.add("b", 20.0, 0.5, prompt_len=5, max_tokens=80)
    with pytest.raises(ValueError, match="already tracked"):
        tracker.add("a", 1.0, 0.0, prompt_len=3, max_tokens=40)
    tracker.on_token("a", 1.0)
    tracker.on_token("a", 1.0)
    assert len(tracker) == 2 and "a" in tracker and list(tracker) == ["a", "b"]
    assert tracker["a"].buffer_tokens(1.0) == 1
    assert dict(tracker.items())["b"].num_generated == 0
    assert tracker.get("missing") is None
    removed = tracker.remove("a")
    assert removed.num_generated == 2 and "a" not in tracker
    with pytest.raises(KeyError):
        tracker.on_token("a", 2.0)


def test_tracker_columns_follow_the_buffers_through_growth_and_row_reuse():
    tracker, sizes = RequestTracker(), {}
    rng = np.random.default_rng(0)
    for i in range(150):  # past the first two growths of the columns
        rid = f"r{i}"
        sizes[rid] = (int(rng.integers(0, 900)), int(rng.integers(1, 2000)))
        tracker.add(rid, float(rng.uniform(1, 40)), float(i), prompt_len=sizes[rid][0], max_tokens=sizes[rid][1])
        for t in np.sort(rng.uniform(i, i + 5, size=int(rng.integers(0, 4)))):
            tracker.on_token(rid, float(t))
        if i % 3 == 0 and f"r{i // 2}" in tracker:  # finished: its row is reused by a later request
            tracker.remove(f"r{i // 2}")
    rids = list(tracker)[::-1]
    cols = tracker.columns(rids)
    for k, rid in enumerate(rids):
        buf = tracker[rid]
        assert (cols.rate[k], cols.arrival[k]) == (buf.rate, buf.arrival)
        assert (cols.prompt_len[k], cols.max_tokens[k]) == sizes[rid]
        assert cols.num_generated[k] == buf.num_generated
        assert cols.last_read[k] == (-np.inf if buf.last_read_time is None else buf.last_read_time)
    with pytest.raises(ValueError, match="max_tokens >= 1"):
        tracker.add("bad", 1.0, 0.0, prompt_len=3, max_tokens=0)
    assert "bad" not in tracker
    # Every add and remove counts (a failed add does not): schedulers notice arrivals and finishes by it.
    assert tracker.membership_changes == 150 + (150 - len(tracker))
    before = tracker.membership_changes
    tracker.on_token(rids[0], 1e6)
    assert tracker.membership_changes == before


@st.composite
def streams(draw):
    rate = draw(st.one_of(st.sampled_from([0.5, 1.0, 2.0, 4.0]), st.floats(0.3, 60)))
    arrival = draw(st.floats(0, 50))
    step = st.one_of(st.sampled_from([0.0, 0.25, 0.5, 1.0]), st.floats(0, 3))
    times = list(itertools.accumulate([arrival + draw(step), *draw(st.lists(step, max_size=50))]))
    queries = draw(st.lists(st.floats(0, 1), min_size=1, max_size=10))
    return arrival, rate, times, queries


@settings(max_examples=150, deadline=None)
@given(streams())
def test_tracker_matches_metrics_read_times(stream):
    arrival, rate, times, fractions = stream
    buffer = VirtualBuffer(rate, arrival)
    for t in times:
        buffer.on_token(t)
    reads = metrics.read_times(times, rate).tolist()
    assert buffer.read_times == reads  # same recurrence, bit for bit
    assert buffer.rebuffer_s == pytest.approx(metrics.rebuffer_seconds(times, rate), abs=1e-9)
    assert buffer.stall_count == metrics.stall_count(times, rate)
    horizon = reads[-1] + 2.0
    for now in [arrival + f * (horizon - arrival) for f in fractions] + times + reads:
        generated = bisect.bisect_right(times, now)
        unread = generated - sum(1 for r in reads if r <= now)
        assert buffer.buffer_tokens(now) == unread
        dry = max(0.0, reads[generated - 1] - now) if generated else 0.0
        assert buffer.time_until_dry(now) == pytest.approx(dry)
        # buffer_seconds charges a full period for the next read, so it leads time_until_dry by < 1/rate
        assert dry - 1e-9 <= buffer.buffer_seconds(now) < dry + 1 / rate + 1e-9
        if unread == 0:
            assert buffer.buffer_seconds(now) == 0.0
