"""The decision (docs/DESIGN.md sections 3.3-3.7 and 3.10-3.13): a pure function from a snapshot of the live
requests to a `Decision` value, who runs, who pauses and when to decide next. The policy checks stress and
timing (`timing`) and carries the decision out a step at a time (`policy`)."""

from __future__ import annotations

import dataclasses
import functools
import math
import operator

import numpy as np

from tokenflow_jax.kv.pages import pages_for
from tokenflow_jax.reader import TAU1_FRACTION
from tokenflow_jax.scheduler.interface import CostEstimates
from tokenflow_jax.scheduler.tokenflow.balancing import Gate, greedy_fill, local_search, rank
from tokenflow_jax.scheduler.tokenflow.config import TokenFlowConfig
from tokenflow_jax.scheduler.tokenflow.feeding import entering_before_overload_ends, lag_behind_s, overload_fed, started
from tokenflow_jax.scheduler.tokenflow.snapshot import Ranking, Snapshot
from tokenflow_jax.scheduler.tokenflow.timing import resume_lead_s
from tokenflow_jax.tracker import ARRIVAL, MAX_TOKENS, NUM_GENERATED, PROMPT_LEN, RATE


@dataclasses.dataclass(frozen=True)
class Decision:
    """Who runs, who pauses, when to decide next, and the figures they came from."""

    running: tuple[str, ...]  # the desired running set, most urgent first (newcomers let into free room last)
    victims: tuple[str, ...]  # running requests left out, most urgent first: paused once an entrant needs room
    give_way_at: float  # when a kept stream could give way to a waiting newcomer: decide again then (inf: no)
    working_set: float  # W
    overloaded: bool  # demand > Gamma: newcomers only take free room (with hysteresis)
    hopeless: bool  # not even the batch memory allows outpaces its readers: plan exactly as fcfs
    spare_rate: float  # Gamma minus the working set's demand, tok/s
    beyond_room: bool = False  # the live requests' projected peak exceeds what the tiers hold: plan as fcfs
    capacity: float = math.inf  # Gamma, tok/s (inf: nothing runs)

    @property
    def as_fcfs(self) -> bool:
        return self.hopeless or self.beyond_room


def decide(snap: Snapshot, est: CostEstimates, config: TokenFlowConfig, was_overloaded: bool) -> Decision:
    """Choose the desired running set (most urgent first) and the running requests it leaves out.

    Running requests sort as if their buffer were `stickiness_s` smaller, so that near-equal buffers do not
    trade places every decision, and swap-ins are capped at `io_fraction` of an interval of load time
    (streams about to run dry come back regardless). `was_overloaded` is the last decision's overload flag,
    for hysteresis."""
    cfg, lead_s = config, resume_lead_s(config, est, snap.slack_s)
    # Working set: how many may run. The live requests' projected peak bounds it and the room (below).
    peak_pages = projected_peak_pages(snap)
    if cfg.wait_beyond_room and snap.rateless is None and beyond_room(snap, peak_pages):
        # Newcomers beyond the room wait outside the decision, where room opens too late for fcfs's way (3.15); with
        # rate-less requests live, fcfs's plan and its rate-less rules stay (3.16).
        weighed = without_newcomers_beyond_room(snap, est, cfg.room_wait_fraction)
        if weighed is not snap:
            snap, peak_pages = weighed, projected_peak_pages(weighed)
    working_set = adapt_working_set(snap, cfg.adaptation_rate, peak_pages)
    # Schedulability: the working set's demand against Gamma; newcomers it cannot cover displace nobody.
    overloaded, hopeless, spare_rate, capacity = schedulability(snap, est, cfg.capacity_hysteresis, was_overloaded)
    # Room: a newcomer the engine cannot hold beside the started streams would be paused by recompute, again and
    # again; until it can, plan as fcfs does (which starts it only into free memory and runs it to its end).
    room_short = beyond_room(snap, peak_pages)
    # Overloaded, newcomers enter by the lowest Gamma of the last `overload_clear_s`, as the overload clears: on a
    # noisy host, one fast estimate let in cohorts the machine then could not feed (3.15). Not overloaded, by that
    # lowest Gamma too, but never below hysteresis x Gamma: a margin as wide as the estimate's recent dips, at most
    # the hysteresis band (admitted up to a noisy Gamma, the next dip found every stream started; 3.15). With
    # rate-less requests live, by the Gamma of now (3.16).
    entry_spare = spare_rate
    if snap.rateless is None and math.isfinite(capacity):
        floor = snap.capacity_floor
        entry_level = floor if overloaded else max(floor, cfg.capacity_hysteresis * capacity)
        entry_spare -= capacity - min(capacity, entry_level)
    newcomers = held_newcomers(snap, overloaded, entry_spare, cfg.overload_entry_fraction, cfg.overload_entry_share)
    # Buffer balancing: rank, fill greedily (the admission gate keeps who cannot cover a pause), local search.
    # Overloaded, someone stalls whatever the order: as under fcfs, the stall falls on the latest admitted (equal
    # urgency and value go by fcfs's order).
    fcfs_order = overloaded and cfg.overload_fcfs_order
    ranking = rank(snap, est, cfg, lead_s, newcomers, fcfs_order)
    gate = Gate(est, cfg.mu, lead_s, churn_per_page(snap, est, cfg.rotation_share))
    order, rids = ranking.order, snap.rids
    chosen, used = greedy_fill(snap, ranking, slot_limit(snap, working_set), newcomers.size > 0,
                               cfg.io_fraction * cfg.reschedule_interval, gate)  # fmt: skip
    victims: tuple[str, ...] = ()
    give_way_at = math.inf
    free_room = newcomers  # newcomers that take only free room, in arrival order
    if chosen is None:  # every contender fits: nobody to pause
        running = list(map(rids.__getitem__, order.tolist()))
        count = order.size
    else:
        used = local_search(snap, ranking, chosen, used, cfg.local_search_iters, gate)
        running = list(map(rids.__getitem__, order[chosen].tolist()))
        left_out = order[~chosen]
        victims = tuple(map(rids.__getitem__, left_out[left_out < snap.num_running].tolist()))
        # A newcomer waits (and the plan is not fcfs's, which admits by memory alone).
        if not hopeless and left_out.size and left_out.max() >= snap.holding_kv:
            give_way_at = snap.now + give_way_in_s(snap, ranking, chosen, est, cfg)
        # Newcomers the fill left out (W, slots) still take free room now, as fcfs would: waiting for a stream to
        # give way while pages sit free only delays their first token.
        left_new = left_out[left_out >= snap.holding_kv]
        left_new = left_new[snap.block[NUM_GENERATED].take(left_new) == 0]
        if left_new.size:
            free_room = np.union1d(newcomers, left_new)
        if free_room.size:  # they get what is left after the room left-out paused streams will need back
            left_out_paused = left_out[left_out >= snap.num_running]
            left_out_paused = left_out_paused[left_out_paused < snap.holding_kv]
            used += int(snap.pages.take(left_out_paused).sum())
            count = int(chosen.sum()) + left_out_paused.size
    # Overloaded, a newcomer let into room that pauses opened would be paused in turn, and stall, until the
    # streams before it in fcfs's order are fed (3.13): room of its own is what fcfs gives it.
    if free_room.size and not (overloaded and started_off_device(snap)):
        entering = fill_free_room(snap, free_room, used, count)
        if overloaded and entering:
            entering = entering[: lent_room(snap, est, cfg, free_room, len(entering), capacity)]
        running += entering
    return Decision(tuple(running), victims, give_way_at, working_set, overloaded, hopeless, spare_rate, room_short,
                    capacity)  # fmt: skip


def churn_per_page(snap: Snapshot, est: CostEstimates, share: float) -> float:
    """Seconds of a swap's round trip per page it moves, beyond the transfer: where swaps stretch the steps (the
    copies share the compute's cores), each page takes `swap_step_per_page_s` from every started stream's step, and
    rotations may take `share` of the machine; so a pause must buy that time over the share (docs/DESIGN.md 3.15)."""
    if est.swap_step_per_page_s <= 0:
        return 0.0
    streams = int((started(snap) & (snap.block[RATE] > 0)).sum())
    return streams * est.swap_step_per_page_s / share


def adapt_working_set(snap: Snapshot, adaptation_rate: float, peak_pages: float) -> float:
    """W: floor(M / beta) with beta the expected pages per live request (every live request when their projected
    peak fits), pulled toward the running count with rate lambda."""
    expected = int(snap.block[PROMPT_LEN : MAX_TOKENS + 1].sum()) / snap.page_size  # prompts + max_tokens
    beta = max(1.0, expected / max(1, len(snap.reqs)))
    static = math.floor(snap.num_device_pages / beta)
    # Everyone at full length need not fit at once: finishes are staggered, so the footprint peaks lower.
    if static < len(snap.reqs) and peak_pages <= snap.num_device_pages:
        static = len(snap.reqs)
    return max(1.0, (1 - adaptation_rate) * static + adaptation_rate * snap.num_running)


def projected_peak_pages(snap: Snapshot) -> float:
    """Device pages the live requests would hold at their peak if all ran from now on (`peak_pages`)."""
    return peak_pages(snap.context, snap.tokens_to_go(), snap.page_size)


def peak_pages(context: np.ndarray, remaining: np.ndarray, page_size: int) -> float:
    """Device pages requests of `context` tokens with `remaining` tokens to go would hold at their peak if all ran
    from now on, one token a step each: the footprint grows until the first of them finishes, drops, grows again;
    its highest point is just before some finish, where the requests still running hold their contexts plus that
    one's remaining tokens."""
    order = remaining.argsort(kind="stable")
    remaining, context = remaining.take(order), context.take(order)
    alive = np.arange(len(order), 0, -1, dtype=np.float64)  # still running just before the j-th finish
    tokens = context[::-1].cumsum()[::-1]
    tokens += alive * remaining
    return float((tokens / page_size + alive).max()) if len(order) else 0.0  # + a partial page each


def schedulability(
    snap: Snapshot, est: CostEstimates, hysteresis: float, was_overloaded: bool
) -> tuple[bool, bool, float, float]:
    """(overloaded, hopeless, spare rate, Gamma): the working set's rates against Gamma at its projected context;
    hopeless when even its slowest reader outpaces one step of that batch (before any admission: the queue's)."""
    block = snap.block[:, started(snap)] if snap.holding_kv else snap.block
    size = block.shape[1]
    hopeless, seqs, step_s = False, 0, 0.0
    sums = block.sum(axis=1)
    if size:
        mean_context = float(sums[PROMPT_LEN] + (sums[NUM_GENERATED] + sums[MAX_TOKENS]) / 2) / size
        seqs, step_s = projected_step(snap, est, size, mean_context)
        rates = block[RATE] if snap.rateless is None else block[RATE][block[RATE] > 0]  # rate-less: no reader
        hopeless = bool(rates.size) and float(rates.min()) * step_s >= 1.0
    if not snap.holding_kv:  # nothing started yet (or only recomputes wait): no demand to weigh
        return False, hopeless, math.inf, math.inf
    # Every started stream paused at once is still owed its tokens: judged as when some run (read as "nothing
    # runs, so no overload", such a moment cleared it and let in every newcomer; docs/DESIGN.md 3.15).
    demand, capacity = float(sums[RATE]), seqs / max(step_s, 1e-9)  # the working set's demand, Gamma
    # An overload clears only below the lowest Gamma of the recent decisions: on a noisy host one fast estimate
    # cleared it for a decision, which started every newcomer the spare rate then covered (3.15).
    cleared = demand < hysteresis * min(capacity, snap.capacity_floor)
    overloaded = True if demand > capacity else False if cleared else was_overloaded
    return overloaded, hopeless, capacity - demand, capacity


def projected_step(snap: Snapshot, est: CostEstimates, num_requests: int, mean_context: float) -> tuple[int, float]:
    """(sequences, seconds) of the decode step a working set will run: at the context it will hold on average
    over the rest of its generation (`mean_context`: prompt + half-way between now and max_tokens), not at the
    short contexts right after a burst (the step grows as outputs do), with as many of it in the batch as
    sequence slots and device memory allow at that context."""
    fits = max(1, int(snap.num_device_pages // pages_for(math.ceil(mean_context), snap.page_size)))
    seqs = min(num_requests, snap.max_num_seqs, fits)
    return seqs, est.decode_step_at(seqs, int(mean_context * seqs))


def beyond_room(snap: Snapshot, peak_pages: float) -> bool:
    """Whether the engine could not hold every live request to its end if all were started now: their projected
    peak footprint (`projected_peak_pages`: finishes are staggered) against the host tier (where write-through
    keeps a copy of the running ones too) or, where that is larger, the device. A stream started beyond that
    room could only be paused by recompute, over and over (docs/DESIGN.md section 3.15)."""
    if not snap.holding_kv and len(snap.reqs) <= 1:
        return False
    return peak_pages > snap.room_pages


def without_newcomers_beyond_room(snap: Snapshot, est: CostEstimates, fraction: float) -> Snapshot:
    """The snapshot the decision weighs: without the newcomers beyond the room (`newcomers_beyond_room`), or
    `snap` itself where room opens for the first of them within `fraction` of its playback: fcfs's way, starting it
    into free memory, costs it about that wait, once its recompute for room comes (3.15). Every live request states
    a rate."""
    beyond = newcomers_beyond_room(snap)
    if not beyond.size:
        return snap
    first = int(beyond[0])
    rest = snap.without_waiting(beyond)
    own = whole_pages(snap, first)
    tolerable_s = fraction * float(snap.block[MAX_TOKENS, first] / snap.block[RATE, first])
    opens = room_opens_in_steps(rest.context, rest.tokens_to_go(), rest.page_size, rest.room_pages, own)
    return rest if opens * est.decode_step_s > tolerable_s else snap


def newcomers_beyond_room(snap: Snapshot) -> np.ndarray:
    """The newcomers (snapshot indices) from the first, in arrival order, whose start would take the projected peak
    of the started requests and the newcomers before it past the room `beyond_room` weighs."""
    fresh_at = (~started(snap)).nonzero()[0]
    return fresh_at[held_to_their_end(snap, fresh_at, snap.room_pages) :]


def held_to_their_end(snap: Snapshot, newcomers: np.ndarray, room: float) -> int:
    """How many of `newcomers` (snapshot indices, arrival order) `room` pages hold beside the started requests to
    their ends: the longest run whose projected peak with theirs (`peak_pages`) fits."""
    base, to_go = started(snap).nonzero()[0], snap.tokens_to_go()

    def fits(k: int) -> bool:
        rows = np.concatenate((base, newcomers[:k]))
        return peak_pages(snap.context.take(rows), to_go.take(rows), snap.page_size) <= room

    low, high = 0, len(newcomers)  # a peak only grows with each request added: bisect for the longest run
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def whole_pages(snap: Snapshot, i: int) -> float:
    """Pages request `i` holds at its end (its whole length, with a partial page)."""
    return float((snap.context[i] + snap.block[MAX_TOKENS, i]) / snap.page_size + 1)


def room_opens_in_steps(
    context: np.ndarray, remaining: np.ndarray, page_size: int, room: float, own_pages: float
) -> float:
    """Decode steps until a newcomer of `own_pages` at its end fits `room` pages beside the rest (requests of
    `context` tokens with `remaining` to go: the started ones and the newcomers before it), if those ran from now
    one token a step each: until their footprint's peak from then on and its whole length fit together (a bound:
    its peak is at most its whole length)."""

    def peak_after(t: float) -> float:  # the rest's footprint from t steps on (it never rises: finishes only)
        alive = remaining > t
        return peak_pages(context[alive] + t, remaining[alive] - t, page_size)

    if peak_after(0.0) + own_pages <= room:
        return 0.0
    if own_pages > room:
        return math.inf
    times = np.unique(remaining)
    lo, hi = 0, times.size - 1  # the first finish after which it fits (at the last every other one has ended)
    while lo < hi:
        mid = (lo + hi) // 2
        if peak_after(float(times[mid])) + own_pages <= room:
            hi = mid
        else:
            lo = mid + 1
    return float(times[lo])


def held_newcomers(
    snap: Snapshot, overloaded: bool, spare_rate: float, entry_fraction: float, entry_share: float
) -> np.ndarray:
    """Newcomers (no token yet) that may not displace anyone (snapshot indices): while overloaded, all but those
    the overload will spare soon enough (`entering_before_overload_ends`) and, where every newcomer states a rate,
    the leading run the started streams' buffers and `entry_share` of Gamma would feed within `entry_fraction` of
    their playback (`overload_fed`); else, in arrival order, those whose rate the spare capacity Gamma - demand no
    longer covers. A rate-less request that must run (held back `max_hold_s`) is never held."""
    first_waiting = snap.holding_kv
    newcomers = (snap.block[NUM_GENERATED, first_waiting:] == 0).nonzero()[0]
    newcomers += first_waiting
    if snap.must_run is not None:  # held back `max_hold_s` already: it contends (first), overloaded or not
        newcomers = newcomers[~snap.must_run.take(newcomers)]
    if not newcomers.size:
        return newcomers
    if overloaded:
        enter = entering_before_overload_ends(snap, newcomers, spare_rate, entry_fraction)
        return newcomers[~(enter | overload_fed(snap, newcomers, spare_rate, entry_fraction, entry_share))]
    rates = snap.block[RATE].take(newcomers)
    total = float(rates.sum())
    if spare_rate == math.inf or total + 1e-9 * (abs(spare_rate) + total) < spare_rate:  # all covered (with
        return newcomers[:0]  # room for the rounding of subtracting one at a time)
    slowest = float(rates.min())
    if slowest > spare_rate:  # none covered
        return newcomers
    # The leading run the spare rate surely covers (cumulative rates clear of it by more than rounding) is
    # admitted at once; its one-at-a-time subtraction is replayed exactly in C; the rest go one by one.
    covered = int((rates.cumsum() < spare_rate - 1e-9 * (abs(spare_rate) + total)).argmin())
    spare_rate = functools.reduce(operator.sub, rates[:covered].tolist(), spare_rate)
    held: list[int] = []  # positions in `newcomers`
    for k, rate in enumerate(rates[covered:].tolist(), covered):
        if spare_rate < slowest:  # no one left fits: the rest are all held
            return np.concatenate((newcomers.take(held), newcomers[k:])) if held else newcomers[k:]
        if rate > spare_rate:
            held.append(k)
        else:
            spare_rate -= rate
    return newcomers.take(held)


def started_off_device(snap: Snapshot) -> bool:
    """Whether a started stream (one with a reader) waits off the device: paused, or to recompute."""
    off = slice(snap.num_running, None)
    waiting = (snap.block[NUM_GENERATED, off] > 0) & (snap.block[RATE, off] > 0)
    return bool(waiting.any())


def lent_room(
    snap: Snapshot, est: CostEstimates, cfg: TokenFlowConfig, free_room: np.ndarray, fitting: int, capacity: float
) -> int:
    """Overloaded, how many of the first `fitting` of `free_room` (newcomers in arrival order that free memory takes
    now) may take it. Room the started streams will grow back into is lent only against deep buffers, or where
    holding the newcomers would make them the queue's last for longer than they have waited: a newcomer started
    there is the latest admitted when they need it, the first paused, and with the thin buffers of an overload its
    pause is a stall its reader would not have had under fcfs (docs/DESIGN.md 3.15)."""
    if deep_buffers(snap, cfg.deep_buffer_fraction):
        return fitting
    held = held_to_their_end(snap, free_room[:fitting], snap.num_device_pages)
    if held < fitting and snap.rateless is None:
        lending = free_room[:fitting]
        joined = snap.block[ARRIVAL].take(lending) >= snap.overload_since
        # Where the live requests' contexts already crowd the device, fcfs too leaves some waiting: the lent room
        # is what the starved newcomer would not have had (the long burst at 30 tok/s; docs/DESIGN.md 3.15).
        joined |= float(snap.pages.sum()) > snap.num_device_pages
        if joined[held:].any():  # the fluid model only where its verdict can hold someone
            lag = lag_behind_s(snap, lending, capacity)
            playback = snap.block[MAX_TOKENS].take(lending) / snap.block[RATE].take(lending)
            starved = ((lag > cfg.overload_entry_fraction * playback) & joined)[held:]
            if starved.any():
                return held + int(starved.argmax())
    if held < fitting and (
        free_room.size - fitting >= fitting - held or device_room_opens_within_wait(snap, est, free_room[: held + 1])
    ):
        return held
    return fitting


def deep_buffers(snap: Snapshot, fraction: float) -> bool:
    """Whether the started streams' median buffer is at least `fraction` x their median playback (False with
    none started)."""
    streams = started(snap) & (snap.block[RATE] > 0)
    if not streams.any():
        return False
    playback = snap.block[MAX_TOKENS, streams] / snap.block[RATE, streams]
    return float(np.median(snap.dry_in[streams])) >= fraction * float(np.median(playback))


def device_room_opens_within_wait(snap: Snapshot, est: CostEstimates, newcomers: np.ndarray) -> bool:
    """Whether room on the device opens for the last of `newcomers` to its end, beside the started requests and
    the others, within the time it has waited since its arrival."""
    last = int(newcomers[-1])
    rows = np.concatenate((started(snap).nonzero()[0], newcomers[:-1]))
    opens = room_opens_in_steps(snap.context.take(rows), snap.tokens_to_go().take(rows), snap.page_size,
                                snap.num_device_pages, whole_pages(snap, last))  # fmt: skip
    return opens * est.decode_step_s <= snap.now - float(snap.block[ARRIVAL, last])


def slot_limit(snap: Snapshot, working_set: float) -> int:
    """Sequence slots the fill may take: W bounds growth by preemptive admission; it never pauses what runs."""
    return min(snap.max_num_seqs, max(math.ceil(working_set), snap.num_running))


def give_way_in_s(
    snap: Snapshot, ranking: Ranking, chosen: np.ndarray, est: CostEstimates, cfg: TokenFlowConfig
) -> float:
    """Seconds until the first stream the fill kept (running or entering) could give way to a newcomer: once
    running, its buffer grows by a token per decode step less what its reader takes, until it is past where it
    sorts after a newcomer (stickiness_s of buffer, or tau1 tokens: a lower value) and past its admission gate
    (mu x the round trip; the gate's bound where the fill did not need the exact one). Streams already past both
    are kept for other reasons and not counted, so a decision that cannot admit does not call the next one at
    once."""
    positions = chosen.nonzero()[0]
    rows = ranking.order.take(positions)
    if snap.rateless is not None:  # a rate-less request has no buffer to grow: it may give way at any time
        streams = ~snap.rateless.take(rows)
        positions, rows = positions[streams], rows[streams]
    rate, dry_in = snap.block[RATE].take(rows), snap.dry_in.take(rows)
    sorts_after = snap.block[MAX_TOKENS].take(rows)
    sorts_after *= TAU1_FRACTION
    sorts_after /= rate
    np.minimum(sorts_after, cfg.stickiness_s, out=sorts_after)
    gate_s = np.fmin(ranking.gate_s.take(positions), ranking.gate_bound_s.take(positions))  # NaN: not computed
    short_s = np.maximum(sorts_after, cfg.mu * gate_s, out=gate_s)
    short_s -= dry_in
    gain = 1.0 / (rate * max(est.decode_step_s, 1e-9))  # buffer seconds a second of running adds
    gain -= 1.0  # less the second its reader reads
    growing = (short_s > 0) & (gain > 0)
    if not growing.any():
        return math.inf
    return max(float((short_s[growing] / gain[growing]).min()), est.decode_step_s)


def fill_free_room(snap: Snapshot, newcomers: np.ndarray, used: int, count: int) -> list[str]:
    """Newcomers held back by schedulability take whatever room is left, in arrival order (fcfs: as memory allows
    now, beyond W), after the `used` pages and `count` slots the working set holds or will need back."""
    new_pages = snap.pages.take(newcomers)
    fits = used + new_pages.cumsum() <= snap.num_device_pages
    fits[max(0, snap.max_num_seqs - count) :] = False
    admitted = len(newcomers) if fits.all() else int(fits.argmin())
    return list(map(snap.rids.__getitem__, newcomers[:admitted].tolist()))
