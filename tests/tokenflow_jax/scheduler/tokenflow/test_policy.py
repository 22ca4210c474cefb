"""TokenFlowPolicy decisions on hand-built scheduler states over a real SimExecutor."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenflow_jax.reader import token_weights
from tokenflow_jax.request import Request, RequestStatus
from tokenflow_jax.sampling import SamplingParams
from tokenflow_jax.scheduler.interface import SchedulerState
from tokenflow_jax.scheduler.registry import make_policy
from tokenflow_jax.scheduler.tokenflow import Snapshot, TokenFlowConfig, TokenFlowPolicy
from tokenflow_jax.scheduler.tokenflow.decision import projected_peak_pages
from tokenflow_jax.sim.executor import SimExecutor
from tokenflow_jax.tracker import MAX_TOKENS, NUM_GENERATED, PROMPT_LEN, RequestTracker

NOW = 10.0


class World:
    """Requests placed directly in the states a policy sees, with buffers set by token times."""

    def __init__(self, *, max_num_seqs: int = 2, device_pages: int = 1024, host_pages: int = 1024) -> None:
        self.ex = SimExecutor("h100-llama3-8b", num_device_pages=device_pages, num_host_pages=host_pages,
                              max_num_seqs=max_num_seqs, max_batch_tokens=256)  # fmt: skip
        self.tracker = RequestTracker()
        self.requests: list[Request] = []

    def add(
        self,
        rid: str,
        status: RequestStatus,
        *,
        rate: float = 20.0,
        buffer_s: float = 0.0,
        generated: int | None = None,
        prompt: int = 32,
        arrival: float = 0.0,
        max_tokens: int = 512,
    ) -> Request:
        req = Request(rid, [1] * prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), rate=rate,
                      arrival=arrival)  # fmt: skip
        req.status = status
        self.tracker.add(rid, rate, arrival, prompt_len=len(req.prompt_ids), max_tokens=req.sampling.max_tokens)
        if status is not RequestStatus.WAITING:
            generated = generated or int(buffer_s * rate) + 2  # enough tokens to hold that buffer
            # `generated` tokens, the last read at NOW + buffer_s: the reader has that much left to read.
            start = NOW + buffer_s - (generated - 1) / rate
            for j in range(generated):
                self.tracker.on_token(rid, min(NOW, start + j / rate))
            req.output_ids = [1] * generated
            req.num_computed = req.num_tokens - 1
            if status is RequestStatus.RUNNING:
                self.ex.blocks.grow_device(req, req.num_computed)
                req.admitted_order = len(self.requests)
            else:
                assert self.ex.blocks.evict_tail(req) is not None  # host copy only
        self.requests.append(req)
        return req

    def state(self) -> SchedulerState:
        def having(status):
            return [r for r in self.requests if r.status is status]

        waiting = sorted(having(RequestStatus.WAITING), key=lambda r: r.arrival)
        return SchedulerState(NOW, waiting, having(RequestStatus.RUNNING), having(RequestStatus.PAUSED),
                              self.tracker, self.ex)  # fmt: skip

    def estimates(self, **changes: float) -> None:
        if "decode_capacity_tok_s" in changes:  # Gamma for a full batch, whatever the context: a flat step
            changes["decode_step_model"] = (self.ex.max_num_seqs / changes["decode_capacity_tok_s"], 0.0, 0.0)
        est = dataclasses.replace(self.ex.estimates(), **changes)
        self.ex.estimates = lambda: est  # type: ignore[method-assign]


def preempted(plan) -> set[str]:
    return set(plan.swap_out) | set(plan.recompute_out)


def test_config_defaults_and_validation():
    cfg = TokenFlowPolicy().config
    assert (cfg.reschedule_interval, cfg.mu) == (0.5, 1.5)
    assert make_policy("tokenflow", mu=2.0).config.mu == 2.0
    with pytest.raises(TypeError):
        TokenFlowPolicy(not_a_knob=1)
    with pytest.raises(ValueError, match="mu"):
        TokenFlowConfig(mu=0.5)
    with pytest.raises(ValueError, match="reschedule_interval"):
        TokenFlowConfig(reschedule_interval=0)
    with pytest.raises(ValueError, match="overload_entry_fraction"):
        TokenFlowConfig(overload_entry_fraction=-0.1)
    with pytest.raises(ValueError, match="room_wait_fraction"):
        TokenFlowConfig(room_wait_fraction=float("nan"))


def test_token_weights_ramp_between_tau1_and_tau2():
    assert token_weights(np.array([10.0, 150.0, 250.0]), 1000).tolist() == pytest.approx([1.0, 0.5, 0.0])


def test_without_stress_it_is_fcfs():
    w = World(max_num_seqs=4)
    w.add("a", RequestStatus.RUNNING, buffer_s=5.0)
    w.add("b", RequestStatus.RUNNING, buffer_s=4.0)
    plan = TokenFlowPolicy().plan(w.state())
    assert plan.schedule == {"a": 1, "b": 1} and not preempted(plan) and not plan.swap_in


@pytest.mark.parametrize("mu, paused", [(1.5, True), (40.0, False)])
def test_admission_gate_by_mu(mu, paused):
    # 2 s of buffer at 20 tok/s = 40 tokens; the gate asks mu * 20 * (~0.25 s lead + round trip).
    w = World(max_num_seqs=1)
    w.add("old", RequestStatus.RUNNING, buffer_s=2.0)
    w.add("new", RequestStatus.WAITING, arrival=5.0)
    plan = TokenFlowPolicy(mu=mu).plan(w.state())
    assert ("old" in preempted(plan)) is paused
    assert ("new" in plan.schedule) is paused
    assert ("old" in plan.schedule) is not paused


def test_balancing_pauses_the_largest_buffer_for_a_newcomer():
    w = World(max_num_seqs=2)
    w.add("small", RequestStatus.RUNNING, buffer_s=3.0)
    w.add("large", RequestStatus.RUNNING, buffer_s=9.0)
    w.add("new", RequestStatus.WAITING, arrival=5.0)
    plan = TokenFlowPolicy().plan(w.state())
    assert plan.swap_out == ["large"]
    assert set(plan.schedule) == {"small", "new"}


def test_working_set_covers_everyone_when_the_projected_peak_fits():
    # Full length (32 + 512 tokens = 34 pages each), 4 requests need 136 of 100 pages, so floor(M / beta) = 2;
    # but 12, 112 and 412 tokens are left to the running ones: the footprint peaks at ~78 pages (all four run on).
    w = World(max_num_seqs=4, device_pages=100)
    w.add("a", RequestStatus.RUNNING, generated=500, buffer_s=10.0, arrival=-30.0)
    w.add("b", RequestStatus.RUNNING, generated=400, buffer_s=8.0, arrival=-30.0)
    w.add("c", RequestStatus.RUNNING, generated=100, buffer_s=4.0, arrival=-30.0)
    w.add("new", RequestStatus.WAITING, arrival=5.0)
    policy = TokenFlowPolicy()
    plan = policy.plan(w.state())
    # Room for everyone (not W = 0.8 * 2 + 0.2 * 3, which would pause the largest buffer for the newcomer).
    assert policy.decision.working_set > 3 and not preempted(plan) and set(plan.schedule) == {"a", "b", "c", "new"}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(1, 300), st.integers(0, 300)), min_size=1, max_size=12),
       st.sampled_from([1, 4, 16]))  # fmt: skip
def test_projected_peak_pages_bounds_a_token_by_token_replay(sizes, page_size):
    # (prompt, max_tokens, generated) per request; every live request decodes one token a step until max_tokens.
    sizes = [(p, m, min(g, m - 1)) for p, m, g in sizes]  # live: a token or more to go
    block = np.zeros((6, len(sizes)))
    block[PROMPT_LEN], block[MAX_TOKENS], block[NUM_GENERATED] = zip(*sizes, strict=True)
    context = block[PROMPT_LEN] + block[NUM_GENERATED]
    snap = Snapshot([], [], 0, 0, block, np.zeros(len(sizes)), context, np.zeros(len(sizes)), now=NOW,
                    page_size=page_size, num_device_pages=0, max_num_seqs=0, host_free=0)  # fmt: skip
    peak = projected_peak_pages(snap)
    replay = max(sum(-(-(p + g + t) // page_size) for p, m, g in sizes if g + t < m) for t in range(301))
    assert replay <= peak <= replay + 2 * len(sizes)


def test_balancing_order_lowest_buffer_first_then_rate():
    w = World(max_num_seqs=2)
    for rid, buffer_s, rate in [("r1", 8.0, 20.0), ("r2", 9.0, 20.0), ("r3", 7.0, 20.0)]:
        w.add(rid, RequestStatus.RUNNING, buffer_s=buffer_s, rate=rate)
    w.add("fast", RequestStatus.WAITING, rate=30.0, arrival=6.0)
    w.add("slow", RequestStatus.WAITING, rate=15.0, arrival=5.0)
    policy = TokenFlowPolicy(stickiness_s=0.0)
    w.ex.max_num_seqs = 3
    plan = policy.plan(w.state())
    # Newcomers (buffer 0) first, the faster reader ahead; then the lowest running buffer (r3).
    assert policy.decision.running[:3] == ("fast", "slow", "r3")
    assert preempted(plan) == {"r1", "r2"}


@pytest.mark.parametrize("max_num_seqs, desired", [(3, ["b", "c", "d"]), (2, ["a", "c"])])
def test_local_search_trades_one_large_request_for_two_small_ones_within_the_slots(max_num_seqs, desired):
    # Newcomers by rate: a (25 pages), b (7), c (1), d (1) on 26 device pages. The fill takes a and c; trading a
    # for b frees room for d too, one more request running, which only a free sequence slot allows.
    w = World(max_num_seqs=max_num_seqs, device_pages=26)
    for rid, prompt, rate in [("a", 400, 30.0), ("b", 100, 25.0), ("c", 16, 20.0), ("d", 16, 15.0)]:
        w.add(rid, RequestStatus.WAITING, prompt=prompt, rate=rate, max_tokens=1)
    policy = TokenFlowPolicy()
    decision = policy.rebalance(w.state(), w.ex.estimates())
    assert decision.victims == () and math.ceil(decision.working_set) >= max_num_seqs  # W (2.4 here) does not bind
    assert list(decision.running) == desired


def test_paused_stream_due_back_displaces_the_largest_buffer():
    w = World(max_num_seqs=2)
    w.add("a", RequestStatus.RUNNING, buffer_s=4.0)
    w.add("b", RequestStatus.RUNNING, buffer_s=6.0)
    w.add("p", RequestStatus.PAUSED, buffer_s=0.1)
    plan = TokenFlowPolicy().plan(w.state())
    assert plan.swap_in == ["p"] and preempted(plan) == {"b"}
    assert set(plan.schedule) == {"a", "p"}


def test_paused_stream_with_comfortable_buffer_waits():
    w = World(max_num_seqs=2)
    w.add("a", RequestStatus.RUNNING, buffer_s=0.5, generated=10)
    w.add("b", RequestStatus.RUNNING, buffer_s=0.6, generated=10)
    w.add("p", RequestStatus.PAUSED, buffer_s=30.0, generated=600)
    plan = TokenFlowPolicy().plan(w.state())
    assert not plan.swap_in and not preempted(plan)


def test_schedulability_fallback_when_rates_exceed_capacity():
    # Memory-bound overload: three streams at 20 tok/s (60 tok/s) in the working set, two sequence slots. A 40 ms
    # step outpaces each reader (not hopeless), but two slots sustain only 2 / 0.04 = 50 tok/s < 60.
    w = World(max_num_seqs=2)
    w.add("a", RequestStatus.RUNNING, buffer_s=5.0)
    w.add("b", RequestStatus.RUNNING, buffer_s=9.0)
    w.add("p", RequestStatus.PAUSED, buffer_s=12.0)
    w.add("new", RequestStatus.WAITING, arrival=5.0)
    w.estimates(decode_capacity_tok_s=50.0)
    policy = TokenFlowPolicy(overload_clear_s=0.0)  # Gamma as each decision sees it (the floor: below)
    plan = policy.plan(w.state())
    assert policy.decision.overloaded and not policy.decision.hopeless
    assert not preempted(plan) and "new" not in plan.schedule
    # Hysteresis: back under capacity (62 > 60) but not under 0.9 of it keeps the fallback.
    w.estimates(decode_capacity_tok_s=62.0)
    policy.clock.last_decision = -1e9
    policy.plan(w.state())
    assert policy.decision.overloaded
    w.estimates(decode_capacity_tok_s=100.0)
    policy.clock.last_decision = -1e9
    plan = policy.plan(w.state())
    assert not policy.decision.overloaded and plan.swap_out == ["b"] and "new" in plan.schedule


def test_an_overload_clears_only_below_the_lowest_capacity_of_the_last_second():
    """On a noisy host one fast estimate of Gamma cleared the overload for a decision, which started every newcomer
    the spare rate then covered (the contended HTTP burst: 2-4 such flips a run, and runs where every stream had
    started by 1.4 s and then stalled, docs/DESIGN.md 3.15). The overload now clears only where the demand is under
    the hysteresis times the lowest Gamma of the decisions of the last `overload_clear_s`."""
    w = World(max_num_seqs=2)
    w.add("a", RequestStatus.RUNNING, buffer_s=5.0)
    w.add("b", RequestStatus.RUNNING, buffer_s=9.0)
    w.add("p", RequestStatus.PAUSED, buffer_s=12.0)
    w.add("new", RequestStatus.WAITING, arrival=5.0)
    w.estimates(decode_capacity_tok_s=50.0)  # 60 tok/s of readers against 50
    policy = TokenFlowPolicy()
    policy.plan(w.state())
    assert policy.decision.overloaded
    w.estimates(decode_capacity_tok_s=100.0)  # one fast estimate, within the second
    policy.clock.last_decision = -1e9
    policy.plan(dataclasses.replace(w.state(), now=NOW + 0.5))
    assert policy.decision.overloaded
    policy.clock.last_decision = -1e9  # a second on, every estimate since as fast
    policy.plan(dataclasses.replace(w.state(), now=NOW + 1.6))
    assert not policy.decision.overloaded
    without = TokenFlowPolicy(overload_clear_s=0.0)
    without.plan(w.state())
    assert not without.decision.overloaded


@pytest.mark.parametrize("gamma, overloaded", [(30.0, True), (100.0, False)])
def test_every_started_stream_paused_at_once_still_counts_against_gamma(gamma, overloaded):
    """A decision that finds every started stream off the device (a rotation's swap-outs landed together) weighs
    their demand as when some run. Read as "nothing runs, so no overload", such moments cleared the overload in 4
    of 8 traced contended HTTP bursts and let in every newcomer the infinite spare rate covered (docs/DESIGN.md
    3.15). Held, the newcomer waits: an overloaded newcomer takes no room a started stream waits for."""
    w = World(max_num_seqs=2)
    w.add("p1", RequestStatus.PAUSED, buffer_s=5.0)
    w.add("p2", RequestStatus.PAUSED, buffer_s=6.0)  # 40 tok/s of readers started, none on the device
    w.add("new", RequestStatus.WAITING, arrival=5.0)
    w.estimates(decode_capacity_tok_s=gamma)
    policy = TokenFlowPolicy()
    plan = policy.plan(w.state())
    assert policy.decision.overloaded is overloaded
    assert math.isfinite(policy.decision.capacity)
    assert ("new" in plan.schedule) is not overloaded


@pytest.mark.parametrize("earlier, admitted", [(40.0, False), (55.0, True)])
def test_overloaded_newcomers_enter_by_the_lowest_gamma_of_the_last_second(earlier, admitted):
    """Overloaded, a newcomer enters once the started streams that end within a tenth of its playback leave room
    for it under Gamma; that Gamma is the lowest of the last `overload_clear_s`, not the estimate of the moment,
    whose fast readings let in cohorts a noisy host then could not feed (docs/DESIGN.md 3.15)."""
    w = World(max_num_seqs=2)
    w.add("a", RequestStatus.RUNNING, buffer_s=5.0, max_tokens=122)  # 20 tokens left: it ends in 1 s
    w.add("b", RequestStatus.RUNNING, buffer_s=9.0)
    w.add("p", RequestStatus.PAUSED, buffer_s=12.0)  # 60 tok/s of readers started
    w.add("new", RequestStatus.WAITING, rate=10.0, arrival=5.0)  # a tenth of its playback: 5.1 s
    policy = TokenFlowPolicy()
    w.estimates(decode_capacity_tok_s=earlier)
    policy.plan(dataclasses.replace(w.state(), now=NOW - 0.5))
    # Now 55 tok/s: once "a" ends, 70 - 20 fits; by the earlier 40 it does not, and "b" and "p" end late.
    w.estimates(decode_capacity_tok_s=55.0)
    policy.clock.last_decision = -1e9
    plan = policy.plan(w.state())
    assert policy.decision.overloaded
    assert ("new" in plan.schedule) is admitted


@pytest.mark.parametrize(
    "buffer_s, arrival, queued, admitted",
    [
        (0.1, 2.0, 0, False),  # thin buffers; room for it opens in 4.7 s, within the 8 s it has waited: held
        (1.0, 2.0, 0, True),  # deep buffers: a pause is covered, it takes the free room
        (0.1, 9.9, 0, True),  # the hold would outlast its 0.1 s wait and leave it the queue's last: fcfs's way
        (0.1, 9.9, 2, False),  # ... unless as many newcomers wait behind it, beyond the free room
    ],
)
def test_overloaded_free_room_the_started_streams_will_need_goes_to_newcomers_only_where_a_hold_costs_little(
    buffer_s, arrival, queued, admitted
):
    """Overloaded, a newcomer takes free room only where the device holds it beside the started streams to their
    ends: started in room their growth claims back, it is the latest admitted when they need it, paused first, and
    with an overload's thin buffers its pause stalled its reader for seconds fcfs never did (H200 Poisson replays at
    30 tok/s: +49% to +101% of a playback). Unless their buffers are deep, or the hold would outlast the newcomer's
    wait so far with no queue behind it: held there, the end of a burst waited for whole finishes (the Qwen2.5-32B
    long burst at 0.9 of memory: 30x fcfs's P99 TTFT). docs/DESIGN.md 3.15."""
    w = World(max_num_seqs=8, device_pages=11)  # one stream fits at the projected context: Gamma 25 < 40 tok/s
    w.add("a", RequestStatus.RUNNING, buffer_s=buffer_s, max_tokens=122)  # both end within 118 steps
    w.add("b", RequestStatus.RUNNING, buffer_s=buffer_s, max_tokens=122)
    w.add("new", RequestStatus.WAITING, arrival=arrival, max_tokens=64)  # its 2 pages are free now
    for i in range(queued):  # prompts too long for the free room
        w.add(f"later{i}", RequestStatus.WAITING, arrival=arrival + 0.01, prompt=200, max_tokens=64)
    w.estimates(decode_step_model=(0.04, 0.0, 0.0))
    policy = TokenFlowPolicy()
    plan = policy.plan(w.state())
    assert policy.decision.overloaded and not policy.decision.hopeless
    assert ("new" in plan.schedule) is admitted
    assert not preempted(plan)


@pytest.mark.parametrize("share, admitted", [(0.8, True), (0.0, False)])
def test_overloaded_a_newcomer_enters_where_the_started_streams_buffers_leave_it_fed(share, admitted):
    """Overloaded (40 tok/s of readers; one stream fits the device at the projected context: Gamma 25), the started
    streams' readers hold 10 s of buffer: for the newcomer's whole 3.2 s playback they need nothing, 0.8 x Gamma
    feeds it and still makes their tokens in time, so it contends and a full buffer gives way. Waiting for the
    overload's end instead (`overload_entry_share` 0: ~15 s away) it sat beside a batch making tokens past tau2,
    worth nothing (the H200 Poisson 5/s replay at 25 tok/s: 0.92x fcfs's effective throughput; docs/DESIGN.md
    3.15)."""
    w = World(max_num_seqs=8, device_pages=31)  # the two streams hold 30 pages: no free room for the newcomer
    w.add("a", RequestStatus.RUNNING, buffer_s=10.0, max_tokens=302)  # 100 tokens to go: their readers need
    w.add("b", RequestStatus.RUNNING, buffer_s=10.0, max_tokens=302)  # 200 by 15 s, 0.8 x Gamma makes 300
    w.add("new", RequestStatus.WAITING, arrival=NOW - 0.1, max_tokens=64)
    w.estimates(decode_step_model=(0.04, 0.0, 0.0))
    policy = TokenFlowPolicy(overload_entry_share=share)
    plan = policy.plan(w.state())
    assert policy.decision.overloaded and not policy.decision.hopeless
    assert ("new" in plan.schedule) is admitted
    assert bool(preempted(plan)) is admitted  # a full buffer makes its room


@pytest.mark.parametrize(
    "arrival, admitted",
    [
        (NOW - 0.5, False),  # joined the overload: fed last, it would get nothing for its whole playback
        (NOW - 1.5, True),  # came before it began (a burst's tail): the hold rules above, which lend here
    ],
)
def test_a_newcomer_that_joins_an_overload_takes_no_room_it_would_be_starved_in(arrival, admitted):
    """Overloaded, a newcomer that arrived after the overload began is held out of free room the started streams
    will need back where, fed last in fcfs's order (each started stream at its reader's pace once its buffer runs
    out, from Gamma), it would fall behind its reader by more than `overload_entry_fraction` of its playback. On
    the H200 Poisson 10/s and gamma 10/s replays at 30 tok/s one such newcomer, the last to fit, took the room,
    was paused when the others grew into it, and stalled 35-38 s where fcfs, with no room for it, started it later:
    +40% and +91% of its playback (docs/DESIGN.md 3.15)."""
    w = World(max_num_seqs=8, device_pages=11)  # one stream fits at the projected context: Gamma 25 < 40 tok/s
    w.add("a", RequestStatus.RUNNING, buffer_s=0.1, max_tokens=122)
    w.add("b", RequestStatus.RUNNING, buffer_s=0.1, max_tokens=122)
    w.estimates(decode_step_model=(0.04, 0.0, 0.0))
    policy = TokenFlowPolicy()
    policy.plan(dataclasses.replace(w.state(), now=NOW - 1.0))  # the overload begins
    assert policy.decision.overloaded
    w.add("new", RequestStatus.WAITING, arrival=arrival, max_tokens=64)  # its 2 pages are free now
    policy.clock.last_decision = -1e9
    plan = policy.plan(w.state())
    assert policy.decision.overloaded and not policy.decision.hopeless
    assert ("new" in plan.schedule) is admitted
    assert not preempted(plan)


@pytest.mark.parametrize(
    "earlier, now, admitted",
    [
        (85.0, 85.0, True),  # a steady Gamma: the newcomer's 20 tok/s fits the 25 spare, no margin
        (70.0, 85.0, False),  # Gamma dipped to 70 within the second: demand stays under 0.9 x 85 = 76.5
        (70.0, 95.0, True),  # 60 + 20 under 0.9 x 95 = 85.5
        (90.0, 85.0, True),  # the earlier Gamma above the present one: no dip, no margin
    ],
)
def test_newcomers_enter_only_within_a_margin_as_wide_as_gammas_recent_dips(earlier, now, admitted):
    """Not overloaded, a newcomer enters while the demand with its rate stays under the lowest Gamma of the last
    `overload_clear_s`, and under no less than `capacity_hysteresis` x Gamma. Admitted up to a noisy Gamma, the
    contended HTTP burst had every stream started when the next dip came (31 s of stalls in one run; docs/DESIGN.md
    3.15); where Gamma holds steady (a GPU, the simulator), there is no margin."""
    w = World(max_num_seqs=2)
    w.add("a", RequestStatus.RUNNING, buffer_s=5.0)
    w.add("b", RequestStatus.RUNNING, buffer_s=9.0)
    w.add("p", RequestStatus.PAUSED, buffer_s=12.0)  # 60 tok/s of readers started
    w.add("new", RequestStatus.WAITING, arrival=5.0)
    policy = TokenFlowPolicy()
    w.estimates(decode_capacity_tok_s=earlier)
    policy.plan(dataclasses.replace(w.state(), now=NOW - 0.5))
    w.estimates(decode_capacity_tok_s=now)
    policy.clock.last_decision = -1e9
    plan = policy.plan(w.state())
    assert not policy.decision.overloaded
    assert ("new" in plan.schedule) is admitted


def test_schedulability_projects_capacity_to_the_context_outputs_will_reach():
    # 2 x 20 tok/s: a 25 ms step now (short contexts) would sustain 80 tok/s, but each stream will hold
    # ~32 + 512/2 tokens on average; at 0.2 ms per context token that step is ~140 ms: 14 tok/s, overloaded.
    w = World(max_num_seqs=2)
    w.add("a", RequestStatus.RUNNING, buffer_s=5.0)
    w.add("b", RequestStatus.RUNNING, buffer_s=9.0)
    w.add("new", RequestStatus.WAITING, arrival=5.0)
    w.estimates(decode_step_s=0.025, decode_step_model=(0.025, 0.0, 0.0002))
    policy = TokenFlowPolicy(overload_clear_s=0.0)
    plan = policy.plan(w.state())
    assert policy.decision.overloaded and not preempted(plan) and "new" not in plan.schedule
    w.estimates(decode_step_s=0.025, decode_step_model=(0.025, 0.0, 0.0))  # contexts would not slow it down
    policy.clock.last_decision = -1e9
    policy.plan(w.state())
    assert not policy.decision.overloaded


@pytest.mark.parametrize("off_device", [False, True])
def test_overloaded_newcomers_take_free_room_unless_a_started_stream_waits_off_the_device(off_device):
    # 60 tok/s of readers (a, b, c); at the context they will reach (~350 tokens, 22 pages) 60 device pages hold
    # two of them: 2 / 0.04 s = 50 tok/s, overloaded but not hopeless. Today's short contexts leave a slot and
    # pages free. With every started stream on the device the newcomer takes them, displacing nobody, as fcfs
    # would. With c paused (KV on the host tier) that room is c's to come back to: a newcomer let in would be
    # paused in turn, dry, by fcfs's order (docs/DESIGN.md 3.13), so it waits for room of its own.
    w = World(max_num_seqs=4, device_pages=60)
    w.add("a", RequestStatus.RUNNING, buffer_s=5.0)
    w.add("b", RequestStatus.RUNNING, buffer_s=0.1)
    w.add("c", RequestStatus.PAUSED if off_device else RequestStatus.RUNNING, buffer_s=12.0)
    w.add("new", RequestStatus.WAITING, arrival=5.0)
    w.estimates(decode_capacity_tok_s=100.0)  # flat 4 / 100 = 40 ms step
    policy = TokenFlowPolicy()
    plan = policy.plan(w.state())
    assert policy.decision.overloaded and not policy.decision.hopeless
    assert ("new" in plan.schedule) is not off_device
    assert {"a", "b"} <= set(plan.schedule) and not preempted(plan)
    assert "c" not in plan.swap_in


@pytest.mark.parametrize("changes, host_pages, expect", [
    ({}, 1024, "swap"),  # moving ~5 pages costs far less than recomputing ~70 tokens
    ({"pending_transfer_s": 5.0}, 1024, "recompute"),  # a long transfer queue makes I/O the slower way
    ({"prefill_per_token_s": 1e-9}, 1024, "recompute"),  # recompute is nearly free
    ({}, 1, "recompute"),  # the host tier is full
])  # fmt: skip
def test_reload_vs_recompute(changes, host_pages, expect):
    w = World(max_num_seqs=1, host_pages=host_pages)
    w.add("old", RequestStatus.RUNNING, buffer_s=30.0)
    w.add("new", RequestStatus.WAITING, arrival=5.0)
    w.estimates(**changes)
    plan = TokenFlowPolicy(mu=1.0, resume_margin_s=0.0).plan(w.state())
    assert (plan.swap_out if expect == "swap" else plan.recompute_out) == ["old"]


def test_out_of_pages_mid_decode_preempts_the_largest_buffer():
    w = World(max_num_seqs=4, device_pages=10)
    # 32 + 49 tokens, 80 computed = 5 full pages each; the next token of "a" needs a sixth and none is free.
    a = w.add("a", RequestStatus.RUNNING, buffer_s=1.0, generated=49)
    w.add("b", RequestStatus.RUNNING, buffer_s=7.0, generated=49)
    assert w.ex.free_device_pages() == 0 and len(a.device_pages) == 5
    plan = TokenFlowPolicy().plan(w.state())
    assert preempted(plan) == {"b"} and plan.schedule == {"a": 1}


@pytest.mark.parametrize("late_buffer_s, victim", [
    (3.0, "late"),  # past stickiness_s: the largest buffer yields, as it would without the overload
    (0.4, "latest"),  # none past it: the latest arrival, not the latest admitted ("back"), nor the largest buffer
])  # fmt: skip
def test_out_of_pages_while_overloaded_a_small_buffer_yields_by_arrival(late_buffer_s, victim):
    # Demand 70 tok/s against Gamma 33 (2 sequences at the projected context, a 60 ms step): overloaded, not hopeless
    # (10 tok/s x 60 ms < 1). 32 + 47 tokens, 78 computed = 5 pages each: all three fit, so the decision leaves none
    # out. Two steps on, with no decision due, the first one's next token needs a sixth page and none is free.
    w = World(max_num_seqs=4, device_pages=15)
    running = {"latest": (30.0, 0.3, 3.0), "late": (10.0, late_buffer_s, 2.0), "back": (30.0, 0.2, 1.0)}
    reqs = [w.add(rid, RequestStatus.RUNNING, max_tokens=64, rate=rate, buffer_s=buf, generated=47, arrival=arrival)
            for rid, (rate, buf, arrival) in running.items()]  # fmt: skip
    assert w.ex.free_device_pages() == 0
    w.estimates(decode_step_s=0.06, decode_step_model=(0.06, 0.0, 0.0))
    policy = TokenFlowPolicy()
    assert set(policy.plan(w.state()).schedule) == {"latest", "late", "back"}
    assert policy.decision.overloaded and not policy.decision.as_fcfs and not policy.decision.victims
    for req in reqs:  # two decode steps, still within the last 5 pages
        for _ in range(2):
            req.output_ids.append(1)
            req.num_computed += 1
            w.tracker.on_token(req.request_id, NOW)
    decisions = policy.decisions
    plan = policy.plan(w.state())
    assert policy.decisions == decisions  # no decision: the shortage is met while carrying the last one out
    assert preempted(plan) == {victim}
    assert set(plan.schedule) == {"latest", "late", "back"} - {victim}


def test_a_victim_is_paused_only_when_an_entrant_takes_its_room():
    # Both paused streams are due and both running ones may pause, but a load outlasts a step, so only one
    # stream loads now: only one running request yields (pausing both would leave a batch of one).
    w = World(max_num_seqs=2)
    w.add("a", RequestStatus.RUNNING, buffer_s=4.0)
    w.add("b", RequestStatus.RUNNING, buffer_s=6.0)
    w.add("p1", RequestStatus.PAUSED, buffer_s=0.1, arrival=1.0)
    w.add("p2", RequestStatus.PAUSED, buffer_s=0.1, arrival=2.0)
    w.estimates(decode_step_s=0.02, swap_in_per_page_s=0.01)  # ~3 pages: a 30 ms load for a 20 ms step
    policy = TokenFlowPolicy()
    plan = policy.plan(w.state())
    assert len(plan.swap_in) == 1 and preempted(plan) == {"b"}
    assert set(plan.schedule) == {"a", *plan.swap_in}


def test_hopeless_overload_plans_exactly_as_fcfs():
    # A 60 ms step at any batch: no 20 tok/s reader can be kept fed, so rotating buffers only adds transfers.
    w = World(max_num_seqs=2)
    w.add("a", RequestStatus.RUNNING, buffer_s=4.0)
    w.add("b", RequestStatus.RUNNING, buffer_s=9.0)
    w.add("p", RequestStatus.PAUSED, buffer_s=0.1)
    w.add("new", RequestStatus.WAITING, arrival=5.0)
    w.estimates(decode_step_s=0.06, decode_step_model=(0.06, 0.0, 0.0))
    policy = TokenFlowPolicy()
    plan = policy.plan(w.state())
    assert policy.decision.hopeless
    assert plan == make_policy("fcfs").plan(w.state())
    assert not preempted(plan) and plan.schedule == {"a": 1, "b": 1}


def test_decides_at_most_every_interval_between_events():
    w = World(max_num_seqs=1)
    w.add("old", RequestStatus.RUNNING, buffer_s=0.2, generated=5)
    w.add("new", RequestStatus.WAITING, arrival=5.0)
    policy = TokenFlowPolicy()
    policy.plan(w.state())
    policy.plan(w.state())
    assert policy.decisions == 1


def test_real_engine_burst_preempts_and_matches_fcfs_outputs():
    from tokenflow_jax import LLM

    prompts = [f"stream {i} reads" for i in range(6)]
    outputs, preemptions = {}, {}
    for scheduler in ("fcfs", "tokenflow"):
        # Decisions every 50 ms: the first streams' 32 tokens take longer than that however fast the host is (at
        # the default 0.5 s they could all finish before a decision would pause any of them).
        config = {"reschedule_interval": 0.05} if scheduler == "tokenflow" else None
        llm = LLM("tiny-random", scheduler=scheduler, max_num_seqs=4, max_batch_tokens=32, max_model_len=128,
                  kv_pages=11, warmup=False, scheduler_config=config)  # fmt: skip
        try:
            out = llm.generate(prompts, SamplingParams(max_tokens=32, ignore_eos=True), rates=[5.0] * len(prompts))
            outputs[scheduler] = [o.token_ids for o in out]
            preemptions[scheduler] = sum(r.preemptions_swap + r.preemptions_recompute
                                         for r in llm.core.records.values())  # fmt: skip
        finally:
            llm.close()
    assert preemptions["tokenflow"] > 0
    assert outputs["tokenflow"] == outputs["fcfs"]
    assert all(len(t) == 32 for t in outputs["tokenflow"])
