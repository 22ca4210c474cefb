"""Rate-less requests kept out of the step while the streams alone fill it to their readers' period
(docs/DESIGN.md section 3.16), run on the simulator against fcfs on the same workload.

A step costs 10 ms plus 8 ms a sequence (no context term), so readers at 20 tok/s (one token every 50 ms) are fed
by a batch of at most 5. Two streams and four agents (rate-less) arrive at t=0 on six sequence slots: all six in
one step take 58 ms, every stream stalls and the batch is hopeless, so tokenflow plans as fcfs does; the two
streams alone take 26 ms, so the agents share the step only as far as 0.95 x 50 ms allows (two of them, furthest
from done first) and the rest sit it out with their KV in place. Two more streams arrive at t=1 with every slot
taken: fcfs makes them wait for an agent to finish, tokenflow pauses agents that sit the step out for them. No
agent goes `max_hold_s` without a token. Where even one sequence outpaces the readers (a 60 ms step), nothing is
left out: the plan is fcfs's to the token.
"""

from __future__ import annotations

import dataclasses

import pytest

from tests.tokenflow_jax.scheduler.tokenflow.test_scenario import TWO_SLOTS_40_TOK_S
from tokenflow_jax.engine.core import EngineCore
from tokenflow_jax.metrics import rebuffer_seconds
from tokenflow_jax.request import Request
from tokenflow_jax.sampling import SamplingParams
from tokenflow_jax.scheduler.fcfs import FCFSPolicy
from tokenflow_jax.scheduler.tokenflow import TokenFlowPolicy
from tokenflow_jax.sim.executor import SimExecutor

EIGHT_MS_A_SEQUENCE = dataclasses.replace(TWO_SLOTS_40_TOK_S, name="8-ms-a-sequence", step_base_s=0.010,
                                          step_per_token_s=0.008)  # fmt: skip
SIXTY_MS_BASE = dataclasses.replace(EIGHT_MS_A_SEQUENCE, name="60-ms-base", step_base_s=0.060)
MAX_HOLD_S = 3.0


def request(rid: str, rate: float | None, arrival: float, output: int) -> Request:
    return Request(rid, [1] * 4, SamplingParams(max_tokens=output, ignore_eos=True), rate=rate, arrival=arrival)


def workload() -> list[Request]:
    return [request("S1", 20.0, 0.0, 300), request("S2", 20.0, 0.0, 300),
            *(request(f"A{i}", None, 0.0, 200 + 20 * i) for i in range(4)),
            request("S3", 20.0, 1.0, 300), request("S4", 20.0, 1.0, 300)]  # fmt: skip


def run(policy, profile=EIGHT_MS_A_SEQUENCE) -> EngineCore:
    ex = SimExecutor(profile, max_num_seqs=6, max_batch_tokens=64)
    core = EngineCore(ex, policy)
    arrivals = workload()
    while core.has_work() or arrivals:
        while arrivals and ex.now() >= arrivals[0].arrival:
            core.add_request(arrivals.pop(0))
        if not core.has_work():
            ex.idle_until(arrivals[0].arrival)
            continue
        core.step()
    return core


def stall_share(core: EngineCore, rids: list[str]) -> float:
    recs = [core.records[rid] for rid in rids]
    return sum(rebuffer_seconds(r.token_times, r.rate) for r in recs) / sum(len(r.token_times) / r.rate for r in recs)


@pytest.fixture(scope="module")
def runs() -> tuple[EngineCore, EngineCore]:
    return run(FCFSPolicy()), run(TokenFlowPolicy(max_hold_s=MAX_HOLD_S))


STREAMS = ["S1", "S2", "S3", "S4"]
AGENTS = [f"A{i}" for i in range(4)]


def test_every_request_finishes(runs):
    for core in runs:
        assert {rid: len(rec.token_times) for rid, rec in core.records.items()} == {
            **dict.fromkeys(STREAMS, 300),
            **{f"A{i}": 200 + 20 * i for i in range(4)},
        }


def test_the_streams_do_not_stall_where_fcfs_stalls_them(runs):
    fcfs, tokenflow = runs
    assert stall_share(fcfs, STREAMS) > 0.05  # 58 ms steps against 50 ms readers while the agents run
    assert stall_share(tokenflow, STREAMS) < 0.01
    for rid in STREAMS:
        assert stall_share(tokenflow, [rid]) < 0.02, rid


def test_the_late_streams_take_the_slots_of_agents_sitting_out(runs):
    fcfs, tokenflow = runs
    for rid in ("S3", "S4"):
        assert fcfs.records[rid].token_times[0] > 5.0  # behind agents that run to their end
        assert tokenflow.records[rid].token_times[0] < 1.5
    paused = sum(tokenflow.records[rid].preemptions_swap + tokenflow.records[rid].preemptions_recompute
                 for rid in AGENTS)  # fmt: skip
    assert paused >= 2
    for rid in STREAMS:
        assert tokenflow.records[rid].preemptions_swap == tokenflow.records[rid].preemptions_recompute == 0


def test_no_agent_goes_max_hold_s_without_a_token(runs):
    _, tokenflow = runs
    for rid in AGENTS:
        times = [0.0, *tokenflow.records[rid].token_times]
        assert max(b - a for a, b in zip(times, times[1:], strict=False)) <= MAX_HOLD_S + 0.5, rid


def test_where_the_streams_alone_outpace_their_readers_the_plan_is_fcfs_s():
    fcfs, tokenflow = run(FCFSPolicy(), SIXTY_MS_BASE), run(TokenFlowPolicy(max_hold_s=MAX_HOLD_S), SIXTY_MS_BASE)
    assert {rid: rec.token_times for rid, rec in tokenflow.records.items()} == {
        rid: rec.token_times for rid, rec in fcfs.records.items()
    }


def test_rateless_step_fraction_must_be_a_positive_finite_number():
    assert TokenFlowPolicy().config.rateless_step_fraction == 0.95
    for bad in (0.0, -0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="rateless_step_fraction"):
            TokenFlowPolicy(rateless_step_fraction=bad)
