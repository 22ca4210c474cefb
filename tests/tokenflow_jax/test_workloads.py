"""Workload generators: arrival statistics, length and rate distributions, trace replay."""

from __future__ import annotations

import numpy as np
import pytest

from tokenflow_jax import workloads
from tokenflow_jax.workloads import LengthDist, RateMix, RequestSpec

AZURE_TRACE = workloads.AZURE_CONV_2023


def arrivals(specs: list[RequestSpec]) -> np.ndarray:
    return np.array([s.arrival for s in specs])


def test_burst_arrives_at_once():
    specs = workloads.burst(60, seed=3)
    assert len(specs) == 60 and set(arrivals(specs)) == {0.0}
    assert len({s.request_id for s in specs}) == 60


def test_poisson_mean_inter_arrival():
    specs = workloads.poisson(4000, request_rate=4.0, seed=1)
    times = arrivals(specs)
    assert len(specs) == 4000 and times[0] == 0.0 and np.all(np.diff(times) >= 0)
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(0.25, rel=0.05)
    assert gaps.var() / gaps.mean() ** 2 == pytest.approx(1.0, rel=0.15)


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gamma_cv2_is_inverse_burstiness(burstiness):
    gaps = np.diff(arrivals(workloads.gamma(4000, 2.0, burstiness, seed=7)))
    assert gaps.mean() == pytest.approx(0.5, rel=0.08)
    assert gaps.var() / gaps.mean() ** 2 == pytest.approx(1 / burstiness, rel=0.25)


def test_infinite_rate_is_a_burst():
    assert set(arrivals(workloads.poisson(10, float("inf")))) == {0.0}


def test_seed_reproducibility():
    assert workloads.gamma(50, 3.0, 0.5, seed=11) == workloads.gamma(50, 3.0, 0.5, seed=11)
    assert workloads.gamma(50, 3.0, 0.5, seed=11) != workloads.gamma(50, 3.0, 0.5, seed=12)


def test_normal_lengths():
    specs = workloads.burst(20000, prompt="512:128", output=LengthDist(1024, 64), seed=5)
    prompts = np.array([s.prompt_len for s in specs])
    outputs = np.array([s.output_len for s in specs])
    assert prompts.mean() == pytest.approx(512, rel=0.01) and prompts.std() == pytest.approx(128, rel=0.03)
    assert outputs.mean() == pytest.approx(1024, rel=0.01) and outputs.std() == pytest.approx(64, rel=0.03)
    assert prompts.dtype.kind == "i"


def test_lengths_are_clipped():
    values = LengthDist.parse("10:50:20").sample(np.random.default_rng(0), 5000)
    assert values.min() == 1 and values.max() == 20
    assert set(LengthDist.parse("7").sample(np.random.default_rng(0), 10)) == {7}


@pytest.mark.parametrize("spec", ["", "a:b", "1:2:3:4", "512:-1", "0:1", "512:128:0", "512:128:1.5", "512:"])
def test_malformed_length_specs(spec):
    with pytest.raises(ValueError, match="spec"):
        LengthDist.parse(spec)


def test_rate_mix_proportions():
    mix = RateMix.parse("15:0.4,20:0.6")
    assert mix == RateMix((15.0, 20.0), (0.4, 0.6))
    specs = workloads.burst(20000, rates=mix, seed=2)
    rates = np.array([s.rate for s in specs])
    assert set(rates) == {15.0, 20.0}
    assert np.mean(rates == 15.0) == pytest.approx(0.4, abs=0.015)
    assert {s.rate for s in workloads.burst(20, rates="25")} == {25.0}
    assert {s.rate for s in workloads.burst(20, rates=30)} == {30.0}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("15:0.4,20:0.5", "sum to 1"),
        ("15:0.4,20", "RATE:WEIGHT"),
        ("x", "not a number"),
        ("-5", "> 0"),
        ("15:0.5:1", "RATE:WEIGHT"),
        ("0:1", "> 0"),
        ("15:-0.5,20:1.5", ">= 0"),
    ],
)
def test_malformed_rate_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        RateMix.parse(spec)


def test_rate_weights_within_tolerance_are_accepted():
    RateMix.parse("15:0.3333333,20:0.6666667")


def test_paper_setups_scale_down():
    prompt, output = workloads.paper_lengths("long", scale=1 / 16)
    assert (prompt.mean, output.mean) == (64, 128)
    with pytest.raises(ValueError, match="unknown setup"):
        workloads.paper_lengths("medium")
    specs = [RequestSpec("a", 0.0, 512, 1024, 20.0), RequestSpec("b", 1.0, 1, 1, 20.0)]
    scaled = workloads.scale_lengths(specs, prompt_scale=0.25, output_scale=0.5)
    assert [(s.prompt_len, s.output_len) for s in scaled] == [(128, 512), (1, 1)]
    assert scaled[1].arrival == 1.0


def test_parse_timestamp_keeps_seven_digits():
    whole, fraction = workloads.parse_timestamp("2023-11-16 18:15:46.6805900")
    assert fraction == pytest.approx(0.68059, abs=1e-12)
    later_whole, later_fraction = workloads.parse_timestamp("2023-11-16T18:15:47.1805901Z")
    assert (later_whole - whole) + (later_fraction - fraction) == pytest.approx(0.5000001, abs=1e-10)
    assert workloads.parse_timestamp("12.5") == (12, 0.5)
    with pytest.raises(ValueError, match="timestamp"):
        workloads.parse_timestamp("16/11/2023")


@pytest.fixture(scope="module")
def azure() -> list[RequestSpec]:
    return workloads.trace(AZURE_TRACE)


def test_azure_trace_replay(azure):
    times = arrivals(azure)
    assert len(azure) == 19366
    assert times[0] == 0.0 and np.all(np.diff(times) >= 0)
    assert 3400 < times[-1] < 3600  # about one hour
    assert (azure[0].prompt_len, azure[0].output_len) == (374, 44)
    assert np.mean([s.prompt_len for s in azure]) == pytest.approx(1155, rel=0.01)


def test_faithful_gamma_burstiness_is_the_shipped_traces(azure):
    """The faithful setups' gamma arrivals take k = 1/CV^2 of the trace's inter-arrival gaps."""
    from tokenflow_jax.bench.faithful import AZURE_CONV_BURSTINESS

    gaps = np.diff(arrivals(azure))
    assert gaps.mean() ** 2 / gaps.var() == pytest.approx(AZURE_CONV_BURSTINESS, abs=0.005)


def test_azure_trace_time_scaling_and_window(azure):
    faster = workloads.trace(AZURE_TRACE, time_scale=2.0, max_requests=500)
    assert len(faster) == 500
    assert faster[-1].arrival == pytest.approx(azure[499].arrival / 2, rel=1e-12)
    window = workloads.trace(AZURE_TRACE, start=10, max_requests=5, length_scale=0.5)
    assert window[0].arrival == 0.0
    assert [s.request_id for s in window] == [f"trace-{i}" for i in range(10, 15)]
    assert window[1].arrival == pytest.approx(azure[11].arrival - azure[10].arrival, abs=1e-9)
    assert window[0].prompt_len == max(1, round(azure[10].prompt_len * 0.5))


def test_small_trace(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:16:00.1000000,30,0\n"  # out of order on purpose
        "2023-11-16 18:15:59.9000000,100,20\n"
        "2023-11-16 18:16:01.4000000,7,9\n"
    )
    specs = workloads.trace(path, rates="15:0.5,20:0.5", seed=4)
    assert [s.request_id for s in specs] == ["trace-1", "trace-0", "trace-2"]
    assert arrivals(specs) == pytest.approx([0.0, 0.2, 1.5], abs=1e-9)
    assert specs[1].output_len == 1  # zero generated tokens still streams one
    half = workloads.trace(path, time_scale=2.0)
    assert arrivals(half) == pytest.approx([0.0, 0.1, 0.75], abs=1e-9)
    slow = workloads.trace(path, time_scale=0.5, length_scale=2.0, max_prompt_len=150)
    assert arrivals(slow)[-1] == pytest.approx(3.0) and slow[0].prompt_len == 150
    assert workloads.trace(path, start=5) == []


def test_bad_traces(tmp_path):
    missing = tmp_path / "missing.csv"
    missing.write_text("TIMESTAMP,ContextTokens\n2023-11-16 18:15:59.9,1\n")
    with pytest.raises(ValueError, match="GeneratedTokens"):
        workloads.trace(missing)
    garbled = tmp_path / "garbled.csv"
    garbled.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:59.9,1,2\nyesterday,1,2\n")
    with pytest.raises(ValueError, match="line 3"):
        workloads.trace(garbled)
    with pytest.raises(ValueError, match="time_scale"):
        workloads.trace(garbled, time_scale=0)


def test_make_workload_dispatch(tmp_path):
    assert workloads.make_workload("burst", 5, seed=1) == workloads.burst(5, seed=1)
    assert workloads.make_workload("poisson", 5, request_rate=2.0) == workloads.poisson(5, 2.0)
    gamma = workloads.make_workload("gamma", 5, request_rate=2.0, burstiness=0.5)
    assert gamma == workloads.gamma(5, 2.0, 0.5)
    scaled = workloads.make_workload("burst", 2000, prompt="512:0", output="1024:0", length_scale=0.125)
    assert {(s.prompt_len, s.output_len) for s in scaled} == {(64, 128)}
    replay = workloads.make_workload(f"trace:{AZURE_TRACE}", 10, time_scale=2.0)
    assert len(replay) == 10 and replay[0].arrival == 0.0
    for kind, n, message in [
        ("zipf", 5, "unknown workload"),
        ("burst", None, "number of requests"),
        ("trace:", 5, "needs a path"),
    ]:
        with pytest.raises(ValueError, match=message):
            workloads.make_workload(kind, n)
    with pytest.raises(ValueError, match="request_rate"):
        workloads.poisson(5, 0.0)
    with pytest.raises(ValueError, match="burstiness"):
        workloads.gamma(5, 1.0, 0.0)


def test_chat_turns_grow_by_the_answer_and_a_new_message_and_share_the_system_prompt():
    from tokenflow_jax.sim.replay import prompt_ids

    specs = workloads.chat(10, turns=3, system_len=20, think_s=1.5, burst_size=2, burst_interval=10.0,
                           prompt="8:2", output="16:4", seed=5)  # fmt: skip
    assert len(specs) == 10 and [s.arrival for s in specs] == sorted(s.arrival for s in specs)
    by_id = {s.request_id: s for s in specs}
    assert by_id["chat-0-0"].arrival == by_id["chat-1-0"].arrival == 0.0 and by_id["chat-2-0"].arrival == 10.0
    assert by_id["chat-0-2"].arrival == 3.0  # a turn every think_s
    assert "chat-3-1" not in by_id  # n caps the last conversation
    for c in range(3):
        turns = [by_id[f"chat-{c}-{k}"] for k in range(3)]
        ids = [prompt_ids(t) for t in turns]
        assert [len(i) for i in ids] == [t.prompt_len for t in turns]
        for before, after, spec in zip(ids, ids[1:], turns, strict=False):
            assert after[: len(before)] == before  # the whole earlier prompt, then its answer and a new message
            assert len(after) - len(before) > spec.output_len
    firsts = [prompt_ids(by_id[f"chat-{c}-0"]) for c in range(4)]
    assert all(f[:20] == firsts[0][:20] for f in firsts) and firsts[0][20:] != firsts[1][20:]
    with pytest.raises(ValueError, match="turns >= 1"):
        workloads.chat(4, turns=0)
    assert workloads.make_workload("chat", 6, prompt="8", output="8") == workloads.chat(6, prompt="8", output="8")
