"""Metrics against hand-computed cases and a brute-force transcription of docs/DESIGN.md section 2."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenflow_jax import metrics
from tokenflow_jax.metrics import RequestRecord, summarize

# --- brute force: O(n^2) loops written straight from the DESIGN formulas -------------------------------


def brute_stream(g: list[float], r: float) -> dict:
    n = len(g)
    reads, stall = [], []
    for j in range(n):
        if j == 0:
            reads.append(g[0])
            stall.append(0.0)
        else:
            reads.append(max(g[j], reads[j - 1] + 1 / r))
            stall.append(max(0.0, g[j] - (reads[j - 1] + 1 / r)))
    unread = [j - sum(1 for k in range(j) if reads[k] <= g[j]) for j in range(n)]
    tau1, tau2 = 0.10 * n, 0.20 * n
    weights = []
    for b in unread:
        if b <= tau1:
            weights.append(1.0)
        elif b < tau2:
            weights.append((tau2 - b) / (tau2 - tau1))
        else:
            weights.append(0.0)
    return {"reads": reads, "stalls": stall, "unread": unread, "weights": weights}


def grid_qoe(arrival: float, r: float, reads: list[float], ttft_expected: float, points: int = 200_000):
    """(int A, int min(T, L)) by the midpoint rule on a fine grid."""
    end = reads[-1]
    if end <= arrival:
        return 0.0, 0.0
    dt = (end - arrival) / points
    t = arrival + (np.arange(points) + 0.5) * dt
    digested = np.searchsorted(np.asarray(reads), t, side="right")
    expected = np.clip(r * (t - arrival - ttft_expected), 0, len(reads))
    return float(digested.sum() * dt), float(expected.sum() * dt)


gaps = st.one_of(st.just(0.0), st.floats(0, 0.2), st.floats(0, 3.0))
exact_gaps = st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0])


@st.composite
def streams(draw, exact: bool = False):
    """(arrival, rate, token times): exact=True uses dyadic numbers so reads tie with generations."""
    if exact:
        rate = draw(st.sampled_from([0.5, 1.0, 2.0, 4.0]))
        arrival = draw(st.sampled_from([0.0, 1.0, 2.5]))
        first = draw(exact_gaps)
        steps = draw(st.lists(exact_gaps, max_size=40))
    else:
        rate = draw(st.floats(0.3, 60))
        arrival = draw(st.floats(0, 100))
        first = draw(st.floats(0, 5))
        steps = draw(st.lists(gaps, max_size=60))
    times = list(itertools.accumulate([arrival + first, *steps]))
    return arrival, rate, times


# --- hand-computed cases --------------------------------------------------------------------------------

G = [0.0, 0.1, 0.2, 2.0]  # rate 2: reads 0, 0.5, 1.0, 2.0; token 4 stalls 0.5 s


def test_reads_stalls_and_buffers_by_hand():
    assert metrics.read_times(G, 2.0).tolist() == [0.0, 0.5, 1.0, 2.0]
    assert metrics.stalls(G, 2.0).tolist() == pytest.approx([0.0, 0.0, 0.0, 0.5])
    assert metrics.rebuffer_seconds(G, 2.0) == pytest.approx(0.5)
    assert metrics.stall_count(G, 2.0) == 1
    # B_3 = 2 - #{0 <= 0.2} = 1; B_4 = 3 - #{0, 0.5, 1.0 <= 2.0} = 0
    assert metrics.unread_at_generation(G, 2.0).tolist() == [0, 0, 1, 0]
    # L = 4: tau1 = 0.4, tau2 = 0.8, so B = 1 weighs 0
    assert metrics.token_weights(G, 2.0).tolist() == [1, 1, 0, 1]


def test_latencies_by_hand():
    record = RequestRecord("r", arrival=0.0, rate=2.0, prompt_len=5, token_times=G)
    m = metrics.request_metrics(record)
    assert m.ttft == 0.0
    assert m.e2e == 2.0
    assert m.tpot == pytest.approx(2.0 / 3.0)
    assert m.itls == pytest.approx([0.1, 0.1, 1.8])
    assert metrics.time_per_output_token([3.0]) is None


def test_weights_in_all_three_regimes():
    # L = 20 all generated at t = 1, rate 1: B = 0, 0, 1, 2, 3, ...; tau1 = 2, tau2 = 4
    burst20 = [1.0] * 20
    assert metrics.unread_at_generation(burst20, 1.0).tolist() == [0, 0, *range(1, 19)]
    weights = metrics.token_weights(burst20, 1.0)
    assert weights.tolist() == [1, 1, 1, 1, 0.5] + [0] * 15
    # L = 15: tau1 = 1.5, tau2 = 3, so B = 2 sits on the ramp at (3 - 2) / 1.5
    weights15 = metrics.token_weights([0.0] * 15, 1.0)
    assert weights15[:5] == pytest.approx([1, 1, 1, 2 / 3, 0])
    assert weights15.sum() == pytest.approx(3 + 2 / 3)
    summary = summarize([RequestRecord("b", 0.0, 1.0, 8, burst20)])
    assert summary["effective_throughput"] == pytest.approx(4.5)  # 4.5 weighted tokens over 1 s
    assert summary["output_throughput"] == pytest.approx(20.0)


def test_qoe_by_hand():
    on_time = [1.0 + j / 4 for j in range(8)]  # first token exactly at ttft_expected, then at rate 4
    assert metrics.andes_qoe(0.0, 4.0, on_time, ttft_expected=1.0) == 1.0
    # rate 1, expected from t = 0: reads 0, 3 -> int A = 3; int min(T, 2) on [0, 3] = 2 + 2 = 4
    assert metrics.andes_qoe(0.0, 1.0, [0.0, 3.0], ttft_expected=0.0) == pytest.approx(0.75)
    # late start: reads 3, 4, 5; T ramps from t = 1 to 4 then holds 3: int T = 4.5 + 3, int A = 2 + 1
    assert metrics.andes_qoe(0.0, 1.0, [3.0, 4.0, 5.0]) == pytest.approx(0.4)
    # finished before anything was expected: nothing was late
    assert metrics.andes_qoe(0.0, 1.0, [0.5]) == 1.0


def test_summarize_by_hand():
    records = [
        RequestRecord("a", 0.0, 2.0, 10, [0.5, 0.6, 0.7, 2.5], preemptions_swap=2),
        RequestRecord("b", 1.0, 1.0, 20, [4.0, 5.0, 6.0]),
        RequestRecord("c", 0.2, 5.0, 30, [], preemptions_recompute=1),  # failed
    ]
    s = summarize(records, swap_bytes_out=100, swap_bytes_in=40, scheduler_times_s=[0.001, 0.003])
    assert s["completed"] == 2 and s["failed"] == 1
    assert s["duration"] == 6.0
    assert s["total_input_tokens"] == 30 and s["total_output_tokens"] == 7
    assert s["request_throughput"] == pytest.approx(2 / 6)
    assert s["output_throughput"] == pytest.approx(7 / 6)
    assert s["effective_throughput"] == pytest.approx(6 / 6)  # weights 1,1,0,1 and 1,1,1
    assert s["request_ids"] == ["a", "b"]
    assert s["ttfts"] == pytest.approx([0.5, 3.0])
    assert s["mean_ttft_ms"] == pytest.approx(1750)
    assert s["median_ttft_ms"] == pytest.approx(1750)
    assert s["std_ttft_ms"] == pytest.approx(1250)
    assert s["p99_ttft_ms"] == pytest.approx(500 + 0.99 * 2500)
    assert s["mean_tpot_ms"] == pytest.approx(1000 * (2 / 3 + 1) / 2)
    assert s["itls"][0] == pytest.approx([0.1, 0.1, 1.8]) and s["itls"][1] == pytest.approx([1.0, 1.0])
    assert s["mean_itl_ms"] == pytest.approx(800)
    assert s["median_itl_ms"] == pytest.approx(1000)
    assert s["mean_e2el_ms"] == pytest.approx(1000 * (2.5 + 5.0) / 2)
    assert s["rebuffer_s"] == pytest.approx(0.5)
    assert s["rebuffer_per_request_s"] == pytest.approx([0.5, 0.0])
    assert s["mean_rebuffer_s"] == pytest.approx(0.25)
    assert s["p99_rebuffer_s"] == pytest.approx(0.495)
    assert s["stall_count"] == 1
    assert s["qoes"] == pytest.approx([1.0, 0.4])
    assert s["qoe"] == pytest.approx(0.7)
    assert (s["preemptions"], s["preemptions_swap"], s["preemptions_recompute"]) == (3, 2, 1)
    assert (s["swap_bytes"], s["swap_bytes_out"], s["swap_bytes_in"]) == (140, 100, 40)
    assert s["mean_scheduler_time_ms"] == pytest.approx(2.0)
    assert s["p99_scheduler_time_ms"] == pytest.approx(1 + 0.99 * 2)
    assert summarize(records, duration=12.0)["output_throughput"] == pytest.approx(7 / 12)


def test_summarize_is_json_ready_and_handles_empty():
    import json

    empty = summarize([])
    assert empty["completed"] == 0 and empty["output_throughput"] == 0.0 and empty["p99_ttft_ms"] == 0.0
    json.dumps(empty, allow_nan=False)
    s = summarize([RequestRecord("x", 0.0, 3.0, 4, [0.2])])
    json.dumps(s, allow_nan=False)
    assert s["mean_tpot_ms"] == 0.0  # L = 1 has no TPOT and is excluded


@pytest.mark.parametrize("rate", [0.0, -2.0, math.nan, math.inf])
def test_bad_rate_is_rejected(rate):
    with pytest.raises(ValueError, match="rate"):
        metrics.read_times([0.0, 1.0], rate)
    with pytest.raises(ValueError, match="rate"):
        summarize([RequestRecord("r", 0.0, rate, 1, [])])


def test_bad_token_times_are_rejected():
    with pytest.raises(ValueError, match="non-decreasing"):
        metrics.read_times([0.0, 2.0, 1.0], 1.0)
    with pytest.raises(ValueError, match="precedes arrival"):
        summarize([RequestRecord("r", 5.0, 1.0, 1, [4.0])])
    with pytest.raises(ValueError, match="finite"):
        metrics.stalls([0.0, math.nan], 1.0)
    with pytest.raises(ValueError, match="duration"):
        summarize([], duration=-1.0)
    with pytest.raises(ValueError, match="no tokens"):
        metrics.andes_qoe(0.0, 1.0, [])


# --- against the brute force on random streams -----------------------------------------------------------


def check_against_brute(arrival: float, rate: float, times: list[float]) -> None:
    want = brute_stream(times, rate)
    assert metrics.read_times(times, rate).tolist() == want["reads"]
    assert metrics.stalls(times, rate).tolist() == pytest.approx(want["stalls"], abs=1e-12)
    assert metrics.unread_at_generation(times, rate).tolist() == want["unread"]
    assert metrics.token_weights(times, rate).tolist() == pytest.approx(want["weights"], abs=1e-12)
    if not times:
        return
    m = metrics.request_metrics(RequestRecord("r", arrival, rate, 1, times))
    assert m.rebuffer_s == pytest.approx(sum(want["stalls"]), abs=1e-9)
    assert m.stall_count == sum(1 for s in want["stalls"] if s > 0)
    assert m.effective_tokens == pytest.approx(sum(want["weights"]))
    assert m.ttft == pytest.approx(times[0] - arrival)
    assert m.itls == pytest.approx([b - a for a, b in itertools.pairwise(times)])
    digested, expected = grid_qoe(arrival, rate, want["reads"], 1.0)
    if expected > 1.0:  # the grid estimate is only trustworthy away from a vanishing denominator
        assert m.qoe == pytest.approx(min(1.0, digested / expected), abs=0.02)
    assert 0.0 <= m.qoe <= 1.0


@settings(max_examples=150, deadline=None)
@given(streams())
def test_matches_brute_force_on_random_streams(stream):
    check_against_brute(*stream)


@settings(max_examples=150, deadline=None)
@given(streams(exact=True))
def test_matches_brute_force_with_ties(stream):
    check_against_brute(*stream)


@settings(max_examples=30, deadline=None)
@given(st.lists(streams(), min_size=1, max_size=6))
def test_summary_throughputs_match_brute_force(batch):
    records = [RequestRecord(f"r{i}", a, r, 7, g) for i, (a, r, g) in enumerate(batch)]
    done = [rec for rec in records if rec.token_times]
    s = summarize(records, duration=10.0)
    weights = sum(sum(brute_stream(rec.token_times, rec.rate)["weights"]) for rec in done)
    assert s["effective_throughput"] == pytest.approx(weights / 10.0)
    assert s["output_throughput"] == pytest.approx(sum(len(rec.token_times) for rec in done) / 10.0)
    assert s["effective_throughput"] <= s["output_throughput"] + 1e-9
    assert s["completed"] == len(done)
