"""The policy's vectorized decision against the same decision written plainly, one request at a time.

`decision.decide` works on numpy arrays for speed (BENCHMARKS.md, "Scheduler time per decision");
`reference_decision` below is the docs/DESIGN.md section 3 heuristic as straightforward Python over Request objects
and their virtual buffers. On random scheduler states both must pick the same running set, in the same order,
and the same requests to preempt.
"""

from __future__ import annotations

import dataclasses
import math
import statistics

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.tokenflow_jax.scheduler.tokenflow.test_policy import World
from tokenflow_jax.reader import TAU1_FRACTION, TAU2_FRACTION
from tokenflow_jax.request import RequestStatus
from tokenflow_jax.scheduler.tokenflow import TokenFlowPolicy
from tokenflow_jax.scheduler.tokenflow.timing import resume_lead_s


def weight(buffer_tokens: int, output_len: int) -> float:
    tau1, tau2 = TAU1_FRACTION * output_len, TAU2_FRACTION * output_len
    if buffer_tokens <= tau1:
        return 1.0
    return 0.0 if buffer_tokens >= tau2 else (tau2 - buffer_tokens) / (tau2 - tau1)


def reference_decision(policy: TokenFlowPolicy, state, est, floor: float = math.inf) -> tuple[list[str], list[str]]:
    """(desired running set, most urgent first; running requests to preempt), given the working set W,
    overload flag and spare rate of the policy's decision for this state; `floor`: the lowest Gamma of the
    earlier decisions within overload_clear_s."""
    cfg, ex, decision = policy.config, state.executor, policy.decision
    running, paused = RequestStatus.RUNNING, RequestStatus.PAUSED
    lead, spare = resume_lead_s(cfg, est), decision.spare_rate
    # Overloaded, a newcomer enters once the started streams, each at its reader's pace to its end, leave demand
    # that fits Gamma with its own within overload_entry_fraction of its playback; the first that cannot stops the
    # rest.
    started = [r for r in (*state.running, *state.paused, *state.waiting)
               if r.status is not RequestStatus.WAITING or r.output_ids]  # fmt: skip
    # ... by the lowest Gamma of the decisions of the last overload_clear_s (this one's included: `floor` the others'),
    # while every live request states a rate.
    gamma = spare + sum(r.rate for r in started)
    if all(r.rate is not None for r in (*state.running, *state.paused, *state.waiting)):
        # Not overloaded, newcomers take the spare rate under that lowest Gamma, but under no less than the
        # hysteresis times Gamma.
        if not decision.overloaded and math.isfinite(gamma):
            spare -= gamma - min(gamma, max(floor, cfg.capacity_hysteresis * gamma))
        gamma = min(gamma, floor)
    ending = sorted(((r.sampling.max_tokens - state.tracker[r.request_id].num_generated) / r.rate, r.rate)
                    for r in started)  # fmt: skip
    entry_open = True
    # Beyond room (the live requests' projected peak past the larger tier), the newcomers from the first whose start
    # takes the started requests' and earlier newcomers' peak past it wait, out of the decision, unless room opens
    # for that first one (the rest running a token a step) within room_wait_fraction of its playback.
    fresh = [r for r in state.waiting if not r.output_ids]
    beyond: set[str] = set()
    room = max(ex.num_host_pages, ex.num_device_pages)
    one_alone = not state.running and not state.paused and len(state.waiting) <= 1
    every_rate = all(r.rate is not None for r in (*state.running, *state.paused, *state.waiting))
    if (
        cfg.wait_beyond_room
        and every_rate
        and not one_alone
        and peak_pages(rows(state, [*started, *fresh]), ex.page_size) > room
    ):
        k = 0
        while k < len(fresh) and peak_pages(rows(state, [*started, *fresh[: k + 1]]), ex.page_size) <= room:
            k += 1
        if k < len(fresh):
            first, rest = fresh[k], rows(state, [*started, *fresh[:k]])
            own = (len(first.prompt_ids) + first.sampling.max_tokens) / ex.page_size + 1
            opens = math.inf
            for t in [0, *sorted({remaining for remaining, _ in rest})]:
                after = [(remaining - t, context + t) for remaining, context in rest if remaining > t]
                if own <= room and peak_pages(after, ex.page_size) + own <= room:
                    opens = t
                    break
            if opens * est.decode_step_s > cfg.room_wait_fraction * first.sampling.max_tokens / first.rate:
                beyond = {r.request_id for r in fresh[k:]}

    def enters(req) -> bool:
        nonlocal entry_open
        playback, demand, clear = req.sampling.max_tokens / req.rate, sum(r for _, r in ending) + req.rate, 0.0
        for end, rate in ending:
            if demand <= gamma:
                break
            demand, clear = demand - rate, end
        entry_open = entry_open and demand <= gamma and clear <= cfg.overload_entry_fraction * playback
        if entry_open:
            ending.append((playback, req.rate))
            ending.sort()
        return entry_open

    # ... or, overloaded with every newcomer stating a rate, the leading run of newcomers (beyond the room aside) that
    # the started streams' buffers and overload_entry_share of that Gamma would feed within overload_entry_fraction
    # of its playback: each started stream needs its reader's pace from when its buffer runs out to its end, each
    # newcomer from now to its end, first come first fed; a newcomer's lag is the largest shortfall of what was made
    # against the need of those before it and its own (at most its own), taken at every start and end of a need.
    fed: set[str] = set()
    entering = [r for r in fresh if r.request_id not in beyond]
    if decision.overloaded and cfg.overload_entry_share > 0 and entering and all(r.rate for r in entering):
        needs = []  # (from, to, rate)
        for r in started:
            buf = state.tracker[r.request_id]
            dry = max(buf.last_read_time - state.now, 0.0) if buf.last_read_time is not None else 0.0
            needs.append((dry, dry + (r.sampling.max_tokens - buf.num_generated) / r.rate, r.rate))
        fresh_needs = [(0.0, r.sampling.max_tokens / r.rate, r.rate) for r in entering]
        kinks = sorted({0.0, *(t for a, b, _ in needs + fresh_needs for t in (a, b))})

        def need(n, t):
            return n[2] * min(max(t - n[0], 0.0), n[1] - n[0])

        made = cfg.overload_entry_share * gamma
        for k, req in enumerate(entering):
            lag = max(min(need(fresh_needs[k], t), max(sum(need(n, t) for n in needs) - made * t
                                                       + sum(need(n, t) for n in fresh_needs[: k + 1]), 0.0))
                      for t in kinks) / req.rate  # fmt: skip
            if lag > cfg.overload_entry_fraction * req.sampling.max_tokens / req.rate:
                break
            fed.add(req.request_id)

    contenders, newcomers = [], []
    for req in (*state.running, *state.paused, *state.waiting):
        buf = state.tracker[req.request_id]
        dry = max(buf.last_read_time - state.now, 0.0) if buf.last_read_time is not None else 0.0
        c = {"req": req, "buffer": math.ceil(dry * req.rate - 1e-9), "load": 0.0, "due": False,
             "pages": -(-(len(req.prompt_ids) + buf.num_generated) // ex.page_size)}  # fmt: skip
        if req.status is running:
            sort_buffer = max(dry - cfg.stickiness_s, 0.0)
        elif req.status is paused:
            c["due"] = dry <= c["pages"] * est.swap_in_per_page_s + lead
            c["load"] = 0.0 if c["due"] else c["pages"] * est.swap_in_per_page_s
            sort_buffer = 0.0 if c["due"] else dry
        else:
            sort_buffer = dry
            if req.request_id in beyond:
                continue
            if not req.output_ids:
                entered = decision.overloaded and (enters(req) | (req.request_id in fed))
                if decision.overloaded and not entered or not decision.overloaded and req.rate > spare:
                    newcomers.append(c)
                    continue
                if not decision.overloaded:
                    spare -= req.rate
        phi = cfg.gamma * math.exp(-sort_buffer)
        c["key"] = (-phi, -weight(c["buffer"], req.sampling.max_tokens), -req.rate, req.status is not running,
                    req.arrival)  # fmt: skip
        contenders.append(c)
    if fcfs_order := decision.overloaded:  # equal urgency and value go by fcfs's order
        for c in contenders:
            c["key"] = (*c["key"][:2], c["req"].rate is None, c["req"].arrival, c["req"].request_id)
    contenders.sort(key=lambda c: c["key"])
    host_free = ex.free_host_pages()
    streams = sum(1 for r in started if r.rate)
    churn = streams * est.swap_step_per_page_s / cfg.rotation_share

    def locked(c, mu=None):  # b_j < mu r_j (t_evict + t_load + t_schedule), the cheaper of swap and recompute
        req = c["req"]
        total = -(-req.num_computed // ex.page_size)
        swap = (est.pending_transfer_s + (total - req.num_host_synced // ex.page_size) * est.swap_out_per_page_s
                + total * est.swap_in_per_page_s)  # fmt: skip
        recompute = req.num_computed * est.prefill_per_token_s
        can_swap = req.num_computed > 0 and total - len(req.host_pages) <= host_free and swap <= recompute
        # Where swaps stretch the steps, a swap also takes its pages' stretch from every started stream, over the
        # share of the machine rotations may take.
        moved = 2 * total - req.num_host_synced // ex.page_size
        round_trip = swap + moved * churn if can_swap else recompute
        t_schedule = est.pending_transfer_s + lead
        mu = cfg.mu if mu is None else mu
        return req.status is running and c["buffer"] < mu * req.rate * (round_trip + t_schedule)

    limit = min(ex.max_num_seqs, max(math.ceil(decision.working_set), len(state.running)))
    capacity, budget = ex.num_device_pages, cfg.io_fraction * cfg.reschedule_interval
    chosen, used, count = [False] * len(contenders), 0, 0
    for i, c in enumerate(contenders):  # most urgent first, while slots, pages and the I/O budget allow
        if count >= limit or used + c["pages"] > capacity or c["load"] > budget:
            continue
        budget -= c["load"]
        chosen[i], used, count = True, used + c["pages"], count + 1
    for i, c in enumerate(contenders):  # left-out running requests that cannot cover a pause come back
        if chosen[i] or not locked(c):
            continue
        for may_drop_due in (False, True):
            if may_drop_due and not locked(c, mu=1.0):
                break
            for j in range(len(contenders) - 1, -1, -1):
                if used + c["pages"] <= capacity and count < limit:
                    break
                d = contenders[j]
                earlier = (d["req"].arrival, d["req"].request_id) < (c["req"].arrival, c["req"].request_id)
                if may_drop_due and fcfs_order and earlier:  # overloaded: fcfs's order decides
                    continue
                if chosen[j] and d["req"].status is not running and d["due"] == may_drop_due:
                    chosen[j], used, count = False, used - d["pages"], count - 1
            if used + c["pages"] <= capacity and count < limit:
                chosen[i], used, count = True, used + c["pages"], count + 1
                break
    for _ in range(cfg.local_search_iters):  # adjacent swaps that free pages for one more request (slots allowing)
        if count >= ex.max_num_seqs:
            break
        for i in range(len(contenders) - 1):
            a, b = contenders[i], contenders[i + 1]
            if not chosen[i] or chosen[i + 1] or b["pages"] >= a["pages"] or locked(a):
                continue
            room = capacity - (used - a["pages"] + b["pages"])
            extra = next((j for j in range(i + 2, len(contenders))
                          if not chosen[j] and contenders[j]["pages"] <= room), None)  # fmt: skip
            if extra is not None:
                chosen[i], chosen[i + 1], chosen[extra] = False, True, True
                used += b["pages"] - a["pages"] + contenders[extra]["pages"]
                count += 1
                break
        else:
            break
    desired = [c["req"].request_id for c, keep in zip(contenders, chosen, strict=True) if keep]
    for c, keep in zip(contenders, chosen, strict=True):  # left-out paused streams will need their room back
        if not keep and c["req"].status is paused:
            used, count = used + c["pages"], count + 1
    # Held back by schedulability, or left out by the fill (W, slots): free room only, in arrival order.
    left_out_new = [c for c, keep in zip(contenders, chosen, strict=True)
                    if not keep and c["req"].status is RequestStatus.WAITING and not c["req"].output_ids]  # fmt: skip
    arrival_order = {r.request_id: i for i, r in enumerate(state.waiting)}
    # Overloaded, none while a started stream waits off the device (the room is its).
    if decision.overloaded and any(r.status is not RequestStatus.RUNNING and r.output_ids for r in started):
        newcomers, left_out_new = [], []
    taking, candidates = [], newcomers + left_out_new
    for c in sorted(candidates, key=lambda c: arrival_order[c["req"].request_id]):
        if count >= ex.max_num_seqs or used + c["pages"] > capacity:
            break
        used, count = used + c["pages"], count + 1
        taking.append(c["req"])
    # Overloaded, unless the started streams' median buffer is at least deep_buffer_fraction x their median
    # playback, only the newcomers up to the first whose start takes the started requests' and earlier newcomers'
    # projected peak past the device, where as many newcomers wait beyond the free room as are held, or where room
    # for the first held (to its end) opens on the device within the time it has waited.
    streams = [r for r in started if r.rate]
    dry = [max((state.tracker[r.request_id].last_read_time or -math.inf) - state.now, 0.0) for r in streams]
    deep = bool(streams) and statistics.median(dry) >= cfg.deep_buffer_fraction * statistics.median(
        r.sampling.max_tokens / r.rate for r in streams
    )
    if decision.overloaded and taking and not deep:
        k = 0
        while k < len(taking) and peak_pages(rows(state, [*started, *taking[: k + 1]]), ex.page_size) <= (
            ex.num_device_pages
        ):
            k += 1
        if k < len(taking) and (
            len(candidates) - len(taking) >= len(taking) - k
            or room_opens_s(state, est, [*started, *taking[:k]], taking[k]) <= state.now - taking[k].arrival
        ):
            taking = taking[:k]
    desired += [r.request_id for r in taking]
    victims = [c["req"].request_id for c, keep in zip(contenders, chosen, strict=True)
               if not keep and c["req"].status is running]  # fmt: skip
    return desired, victims


def room_opens_s(state, est, rest, newcomer) -> float:
    """Seconds (decode steps of `est`) until `newcomer` at its whole length fits the device beside `rest`, each of
    those running one token a step from now: the first finish after which their peak from then on leaves room."""
    ex = state.executor
    own = (len(newcomer.prompt_ids) + newcomer.sampling.max_tokens) / ex.page_size + 1
    if own > ex.num_device_pages:
        return math.inf
    for t in [0, *sorted({remaining for remaining, _ in rows(state, rest)})]:
        alive = [(remaining - t, context + t) for remaining, context in rows(state, rest) if remaining > t]
        if peak_pages(alive, ex.page_size) + own <= ex.num_device_pages:
            return t * est.decode_step_s
    return math.inf


def rows(state, reqs) -> list[tuple[int, int]]:
    """(tokens to go, context) of each of `reqs`."""
    tracker = state.tracker
    return [(r.sampling.max_tokens - tracker[r.request_id].num_generated,
             len(r.prompt_ids) + tracker[r.request_id].num_generated) for r in reqs]  # fmt: skip


def peak_pages(requests: list[tuple[int, int]], page_size: int) -> float:
    """Pages (tokens to go, context) `requests` hold at their highest point if each runs to its end from now, one
    token a step: just before some finish, every one still running holds its context plus that one's tokens to go
    (+ a partial page each)."""
    ordered = sorted(requests)
    return max((sum(context + remaining for _, context in ordered[j:]) / page_size + len(ordered) - j
                for j, (remaining, _) in enumerate(ordered)), default=0.0)  # fmt: skip


request_specs = st.lists(
    st.tuples(
        st.sampled_from([RequestStatus.RUNNING, RequestStatus.PAUSED, RequestStatus.WAITING]),
        st.sampled_from([10.0, 15.0, 20.0, 25.5, 30.0]),  # rate
        st.one_of(st.sampled_from([0.0, 0.05, 0.15, 0.3, 0.6]), st.floats(0.0, 15.0)),  # buffer s (due back: < ~0.3)
        st.integers(1, 300),  # prompt tokens
        st.integers(0, 8),  # arrival (before any token: NOW is 10)
    ),
    min_size=1, max_size=40,
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(
    specs=request_specs,
    max_num_seqs=st.integers(1, 40),
    device_pages=st.integers(20, 1500),
    host_pages=st.sampled_from([4000, 900]),
    max_tokens=st.sampled_from([512, 4096, 8192]),  # with 900 host pages, the peak often outgrows both tiers
    capacity=st.sampled_from([None, 50.0, 400.0, 5000.0]),  # Gamma (None: the profile's)
    earlier=st.sampled_from([None, 30.0, 300.0]),  # Gamma of a decision 0.5 s before (None: none)
    stretch=st.sampled_from([0.0, 1e-3, 2e-2]),  # step seconds a swapped page adds (0: copies overlap compute)
    config=st.fixed_dictionaries({
        "gamma": st.sampled_from([0.0, 1.0]), "stickiness_s": st.sampled_from([0.0, 1.0]),
        "mu": st.sampled_from([1.0, 1.5, 4.0]), "io_fraction": st.sampled_from([0.0, 0.02, 0.5]),
        "local_search_iters": st.sampled_from([0, 4]), "overload_entry_fraction": st.sampled_from([0.0, 0.1, 1.0]),
        "wait_beyond_room": st.booleans(), "room_wait_fraction": st.sampled_from([0.0, 0.1, 100.0]),
        "deep_buffer_fraction": st.sampled_from([0.0, 0.05, 1.0]),
        "overload_entry_share": st.sampled_from([0.0, 0.8, 1.0]),
    }),
)  # fmt: skip
def test_vectorized_decision_equals_the_plain_reference(
    specs, max_num_seqs, device_pages, host_pages, max_tokens, capacity, earlier, stretch, config
):
    w = World(max_num_seqs=max_num_seqs, device_pages=device_pages, host_pages=host_pages)
    for i, (status, rate, buffer_s, prompt, arrival) in enumerate(specs):
        need = -(-(prompt + int(buffer_s * rate) + 2) // w.ex.page_size)
        if status is RequestStatus.RUNNING and need > w.ex.free_device_pages():
            status = RequestStatus.PAUSED  # what does not fit the device waits in the host tier
        w.add(f"r{i}", status, rate=rate, buffer_s=buffer_s, prompt=prompt, arrival=float(arrival),
              max_tokens=max_tokens)  # fmt: skip
    if capacity is not None:
        w.estimates(decode_capacity_tok_s=capacity)
    state, est = w.state(), dataclasses.replace(w.ex.estimates(), swap_step_per_page_s=stretch)
    policy = TokenFlowPolicy(**config)
    floor = math.inf
    if earlier is not None:  # a slower machine half a second ago: its Gamma is the floor an overload enters by
        slower = dataclasses.replace(est, decode_step_model=(max_num_seqs / earlier, 0.0, 0.0))
        floor = policy.rebalance(dataclasses.replace(state, now=state.now - 0.5), slower).capacity
    decision = policy.rebalance(state, est)
    assert (list(decision.running), list(decision.victims)) == reference_decision(policy, state, est, floor)
