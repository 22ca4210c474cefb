"""serving.loadtest's arrivals and argument checks (the load runs themselves go through the real server in
test_app_configs.py and test_burst_stall.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from serving import loadtest
from tokenflow_jax import workloads


def parse(*flags: str):
    return loadtest.build_parser().parse_args(list(flags))


def test_a_burst_sends_everything_at_once_and_poisson_follows_the_workload_generator():
    assert loadtest.arrival_times(parse("--arrivals", "burst", "--num-requests", "5")) == [0.0] * 5
    args = parse("--arrivals", "poisson", "--num-requests", "400", "--request-rate", "8", "--seed", "3")
    times = loadtest.arrival_times(args)
    assert times == [s.arrival for s in workloads.poisson(400, 8.0, seed=3)]
    assert np.mean(np.diff(times)) == pytest.approx(1 / 8, rel=0.15)  # exponential gaps at the asked rate
    bursty = loadtest.arrival_times(parse("--arrivals", "gamma", "--num-requests", "400", "--request-rate", "8",
                                          "--burstiness", "0.25"))  # fmt: skip
    cv = np.std(np.diff(bursty)) / np.mean(np.diff(bursty))
    assert cv == pytest.approx(2.0, rel=0.25)  # CV^2 = 1 / k


@pytest.mark.parametrize(
    "flags",
    [("--num-requests", "0"), ("--contention", "-1"), ("--stream-rate", "0"), ("--stream-rate", "nan"),
     ("--arrivals", "poisson", "--request-rate", "0"), ("--burstiness", "0"), ("--rate-mix", "20:0.5,none:0.4"),
     ("--rate-mix", "fast:1")],
)  # fmt: skip
def test_bad_arguments_exit_2_with_a_message(flags, capsys):
    assert loadtest.main(["--url", "http://127.0.0.1:9", *flags]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_a_rate_mix_draws_each_requests_rate_and_rateless_ones_state_none():
    args = parse("--num-requests", "200", "--rate-mix", "20:0.5,none:0.5", "--seed", "3")
    rates = loadtest.request_rates(args)
    assert rates == workloads.RateMix.parse("20:0.5,none:0.5").sample(np.random.default_rng(3), 200)
    assert set(rates) == {20.0, None}
    bodies = [loadtest.request_body(args, i, random.Random(0), rate) for i, rate in enumerate(rates)]
    assert all(("stream_rate" in b) == (r is not None) for b, r in zip(bodies, rates, strict=True))
    assert loadtest.request_rates(parse("--num-requests", "3", "--stream-rate", "15")) == [15.0] * 3


def test_stream_rate_and_rate_mix_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        parse("--stream-rate", "20", "--rate-mix", "20:0.5,none:0.5")
    assert "not allowed with" in capsys.readouterr().err


def test_competing_processes_run_for_the_block_and_stop_after(tmp_path):
    import multiprocessing

    before = len(multiprocessing.active_children())
    with loadtest.contention(2):
        assert len(multiprocessing.active_children()) == before + 2
    assert len(multiprocessing.active_children()) == before
