"""Mixed traffic in the style of docs/DESIGN.md's worked example (section 3.8), run on the simulator.

Two slots that each decode 40 tok/s. Streams S1 (20 tok/s) and S2 (30 tok/s) and an agent A that states no
rate arrive at t=0. The streams start first; once S1 holds more than a second of buffer (its stickiness) and
covers the round trip, it is paused and A runs on the capacity the streams leave spare (80 - 50 = 30 tok/s).
When S1's reader runs low, S1 is due back and A yields; A comes back when a stream's buffer is full again.
Nobody's reader stalls. With streams that leave almost nothing spare (38 + 38 of 80 tok/s), A would wait for
them to finish; `max_hold_s` bounds that: held back that long, A must run, until its next token.
"""

from __future__ import annotations

import pytest

from tests.tokenflow_jax.scheduler.tokenflow.test_scenario import TWO_SLOTS_40_TOK_S
from tokenflow_jax.engine.core import EngineCore
from tokenflow_jax.metrics import rebuffer_seconds
from tokenflow_jax.request import Request, RequestStatus
from tokenflow_jax.sampling import SamplingParams
from tokenflow_jax.scheduler.fcfs import FCFSPolicy
from tokenflow_jax.scheduler.interface import SchedulerState
from tokenflow_jax.scheduler.tokenflow import TokenFlowPolicy
from tokenflow_jax.sim.executor import SimExecutor

STEP_S = 1 / 40  # one decode step of the two 40 tok/s slots


def request(rid: str, rate: float | None, output: int) -> Request:
    return Request(rid, [1] * 16, SamplingParams(max_tokens=output, ignore_eos=True), rate=rate, arrival=0.0)


def run(s1_rate: float, s2_rate: float, **config) -> tuple[list[tuple[float, str, str, dict[str, float]]], EngineCore]:
    """(time, request, new status, every live reader's seconds until dry then) per status change; the core."""
    ex = SimExecutor(TWO_SLOTS_40_TOK_S, max_num_seqs=2, max_batch_tokens=64)
    core = EngineCore(ex, TokenFlowPolicy(**config))
    for req in (request("S1", s1_rate, 400), request("S2", s2_rate, 400), request("A", None, 200)):
        core.add_request(req)
    events, status = [], {}
    while core.has_work():
        core.step()
        for rid, req in core.requests.items():
            if status.get(rid) is not req.status:
                dry = {k: core.tracker[k].time_until_dry(ex.now()) for k in core.tracker}
                events.append((ex.now(), rid, req.status.value, dry))
                status[rid] = req.status
    return events, core


def changes(events, rid: str, state: str) -> list[tuple[float, dict[str, float]]]:
    return [(t, dry) for t, r, s, dry in events if r == rid and s == state]


@pytest.fixture(scope="module")
def timeline():
    return run(20.0, 30.0)


def test_the_agent_waits_for_the_streams_then_runs_once_s1_has_buffer_to_spare(timeline):
    events, core = timeline
    (t_run, dry), *_ = changes(events, "A", "running")
    (t_pause, _), *_ = changes(events, "S1", "paused")
    assert t_run == t_pause  # S1 made room for A
    assert 0.9 <= t_run <= 1.3  # S1 gains 20 tok/s of buffer: past a second (its stickiness) at t ~ 1
    assert dry["S1"] >= 0.9 and dry["S2"] > 0.2
    assert core.records["S1"].token_times[0] < t_run and core.records["S2"].token_times[0] < t_run


def test_the_agent_yields_when_a_stream_runs_low_and_comes_back(timeline):
    events, _ = timeline
    pauses = changes(events, "A", "paused")
    assert len(pauses) >= 2
    for t, dry in pauses:
        back = [r for tt, r, s, _ in events if tt == t and s == "running" and r != "A"]
        assert back and all(dry[r] < 0.5 for r in back)  # the stream called back was running low
    assert len(changes(events, "A", "running")) >= len(pauses)


def test_no_reader_stalls_and_the_agent_gets_the_spare_capacity(timeline):
    _, core = timeline
    assert set(core.records) == {"S1", "S2", "A"}
    for rid in ("S1", "S2"):
        rec = core.records[rid]
        assert len(rec.token_times) == 400
        assert rebuffer_seconds(rec.token_times, rec.rate) < 0.05, rid
    agent = core.records["A"].token_times
    assert len(agent) == 200
    rate = len(agent) / (agent[-1] - 0.0)
    assert 20.0 <= rate <= 40.0  # the spare 30 tok/s, less the second it waited at the start
    assert agent[-1] < core.records["S1"].token_times[-1]  # it did not wait for the streams to finish


def test_the_hold_bound_lets_an_agent_in_that_the_streams_would_keep_out():
    _, core = run(38.0, 38.0)  # 76 of 80 tok/s go to readers: A waits for a stream to finish
    streams_done = min(core.records[r].token_times[-1] for r in ("S1", "S2"))
    assert core.records["A"].token_times[0] >= streams_done
    events, core = run(38.0, 38.0, max_hold_s=2.0)
    agent = core.records["A"]
    assert 2.0 <= agent.token_times[0] < streams_done  # must-run: in as soon as a stream covers its pause
    assert len(agent.token_times) == 200
    # The hold bounds the wait between its tokens, not how long it runs: once it has made a token it ranks behind
    # the streams again and yields to one running low (run on for the hold, a crowd of held-back requests took
    # half the device through an overload), back within the hold each time, and no reader stalls for it.
    came_in = changes(events, "A", "running")[0][0]
    pauses = [t for t, _ in changes(events, "A", "paused")]
    assert pauses and min(pauses) > came_in and min(pauses) - came_in < 2.0  # yields again well before the hold
    gaps = [b - a for a, b in zip(agent.token_times, agent.token_times[1:], strict=False)]
    assert 1.9 <= max(gaps) <= 2.0 + 2 * STEP_S  # held again, to the bound (plus the step it waits for)
    for rid in ("S1", "S2"):
        rec = core.records[rid]
        assert rebuffer_seconds(rec.token_times, rec.rate) < 0.05, rid


def test_overloaded_newcomers_wait_but_an_agent_held_back_max_hold_s_does_not():
    """Three 15 tok/s streams share two slots until the machine turns 2.2x slower at t=2: 45 tok/s owed against
    ~36 made, overloaded (not hopeless: a 55 ms step is shorter than a reader's 67 ms period). Newcomers then
    displace nobody and take only free room, of which two busy slots leave none (docs/DESIGN.md 3.13), but an agent
    that arrives at t=3 and is held back `max_hold_s` must run: it is not a newcomer to hold, overload or not."""
    ex = SimExecutor(TWO_SLOTS_40_TOK_S, max_num_seqs=2, max_batch_tokens=64, slowdown=((2.0, 2.2),))
    policy = TokenFlowPolicy(max_hold_s=2.0)
    core = EngineCore(ex, policy)
    for rid in ("S1", "S2", "S3"):
        core.add_request(request(rid, 15.0, 400))
    agent = Request("A", [1] * 16, SamplingParams(max_tokens=50, ignore_eos=True), rate=None, arrival=3.0)
    overloaded_when_it_came = None
    while core.has_work():  # (the streams run past t=3: 400 tokens at 15 tok/s)
        if ex.now() >= 3.0 and overloaded_when_it_came is None:
            overloaded_when_it_came = policy.decision.overloaded and not policy.decision.hopeless
            core.add_request(agent)
        core.step()
    assert overloaded_when_it_came
    streams_done = min(core.records[r].token_times[-1] for r in ("S1", "S2", "S3"))
    first = core.records["A"].token_times[0]
    assert 5.0 <= first <= 6.0 < streams_done


def test_max_hold_s_must_be_a_positive_finite_number():
    for bad in (0.0, -1.0, float("inf"), float("nan"), "5"):
        with pytest.raises(ValueError, match="max_hold_s"):
            TokenFlowPolicy(max_hold_s=bad)


def test_planning_as_fcfs_a_running_agent_yields_its_slot_to_a_paused_stream():
    """Planning as fcfs (no room, or no order feeds everyone), fcfs's own plan never pauses, so a stream paused
    before waits behind whatever runs. A rate-less request not bound to run yields its place to it (3.16)."""
    ex = SimExecutor(TWO_SLOTS_40_TOK_S, max_num_seqs=2, max_batch_tokens=64)
    policy = TokenFlowPolicy()
    core = EngineCore(ex, policy)
    for req in (request("S1", 20.0, 400), request("S2", 30.0, 400), request("A", None, 200)):
        core.add_request(req)
    while not (
        core.requests["S1"].status is RequestStatus.PAUSED and core.requests["A"].status is RequestStatus.RUNNING
    ):
        core.step()
    waiting, running, paused = core._queues()
    state = SchedulerState(ex.now(), waiting, running, paused, core.tracker, ex)
    assert "A" not in FCFSPolicy().plan(state).recompute_out  # fcfs keeps it running
    plan = policy._fcfs_plan(state, ex.estimates())
    assert "A" in (*plan.swap_out, *plan.recompute_out)
    assert "S2" in plan.schedule  # the stream running stays
