"""Buffer balancing (docs/DESIGN.md sections 3.4, 3.5, 3.11 and 3.12): contenders ranked by urgency fill
sequence slots and device pages greedily, the admission gate keeps running requests that cannot cover a pause,
and a short local search trades one request for smaller ones."""

from __future__ import annotations

import dataclasses

import numpy as np

from tokenflow_jax.reader import negative_token_weights
from tokenflow_jax.scheduler.interface import CostEstimates
from tokenflow_jax.scheduler.tokenflow.config import TokenFlowConfig
from tokenflow_jax.scheduler.tokenflow.costs import kv_state, preemption_costs, swapped_pages
from tokenflow_jax.scheduler.tokenflow.snapshot import Ranking, Snapshot
from tokenflow_jax.tracker import ARRIVAL, MAX_TOKENS, RATE


def rank(
    snap: Snapshot, est: CostEstimates, cfg: TokenFlowConfig, lead_s: float, held: np.ndarray, fcfs_order: bool = False
) -> Ranking:
    """Contenders by urgency: gamma phi(b) descending, value, rate; ties keep what is on device, then arrival.
    Newcomers `held` back by schedulability (snapshot indices) do not contend. Overloaded (`fcfs_order`, with
    `cfg.overload_fcfs_order`), equal urgency and value go by fcfs's order (arrival, then id) instead.

    A rate-less request has an empty buffer and full value but rate 0: it sorts after every stream as urgent as a
    newcomer (newcomers, streams due back, running streams short of `stickiness_s`) and before every stream with
    buffer to spare, so it runs on what the streams leave. One that must run sorts first."""
    nr, npd, block = snap.num_running, snap.num_paused, snap.block
    n, dry_in = len(snap.reqs), snap.dry_in
    # phi(b) = exp(-b) is decreasing, so the buffer itself orders by gamma phi descending (without exp's
    # rounding ties); gamma = 0 leaves value alone.
    urgency = dry_in.copy() if cfg.gamma > 0 else np.zeros(n)
    if nr and cfg.gamma > 0:
        np.maximum(dry_in[:nr] - cfg.stickiness_s, 0.0, out=urgency[:nr])
    paused_load = paused_due = None
    total_load_s = 0.0
    if npd:
        paused = slice(nr, nr + npd)
        paused_load = snap.pages[paused] * est.swap_in_per_page_s
        paused_due = dry_in[paused] <= paused_load + lead_s
        if snap.rateless is not None:  # a rate-less reader never runs dry: due only once it must run
            paused_due &= ~snap.rateless[paused] | snap.must_run[paused]
        urgency[paused][paused_due] = 0.0  # due back: as urgent as a newcomer
        paused_load[paused_due] = 0.0  # and loads regardless of the I/O budget
        total_load_s = float(paused_load.sum())
    if snap.must_run is not None:
        urgency[snap.must_run] = -1.0  # held back too long: ahead of every stream
    buffer_tokens = snap.buffer_tokens()
    neg_value = negative_token_weights(buffer_tokens, block[MAX_TOKENS])
    off_device = np.ones(n, dtype=bool)
    off_device[:nr] = False
    fcfs_rank = None
    if fcfs_order:
        # Someone stalls whatever the order; fcfs keeps its earliest streams fed. Ranked by buffer alone, the
        # streams left off the device once buffers ran out were whichever happened to be paused then (DESIGN 3.13).
        fcfs_rank = np.empty(n)
        fcfs_rank[np.lexsort((np.array(snap.rids), block[ARRIVAL]))] = np.arange(n)
        keys = [fcfs_rank, neg_value, urgency]
        if snap.rateless is not None:  # a rate-less request still runs on what the streams leave (3.16)
            keys.insert(1, snap.rateless)
        order = np.lexsort(keys)
    else:
        order = np.lexsort((block[ARRIVAL], off_device, np.negative(block[RATE]), neg_value, urgency))
    if held.size:
        contender = np.ones(n, dtype=bool)
        contender[held] = False
        order = order[contender.take(order)]
    return Ranking(order, buffer_tokens, paused_load, paused_due, total_load_s, fcfs_rank=fcfs_rank)


@dataclasses.dataclass(frozen=True)
class Gate:
    """The admission gate: a running request may pause for a newcomer only with b >= mu r (t_evict + t_load +
    t_schedule) tokens, the round trip being the preemption that would happen (swap or recompute, `costs`) and
    t_schedule the copy backlog plus the resume lead. Where swaps stretch the steps (`churn_per_page_s` > 0: the
    copies share the compute's cores), a swap's round trip also counts its pages x `churn_per_page_s`, the step
    time it takes from every started stream over the share of the machine rotations may take (`churn_per_page`)."""

    est: CostEstimates
    mu: float
    lead_s: float
    churn_per_page_s: float = 0.0

    def locked(self, snap: Snapshot, ranking: Ranking, positions: np.ndarray, mu: float | None = None) -> np.ndarray:
        """Which of `positions` are running with a buffer that cannot cover a pause (b < mu r t_gate), as a mask
        over positions. The exact gate reads each request's KV state, so it is computed once per position and
        only where a buffer falls short of the gate's upper bound. A rate-less request (rate 0: b >= 0 always
        covers) is locked only once it must run."""
        positions = positions[ranking.on_device.take(positions)]
        rows = ranking.order.take(positions)
        if snap.must_run is not None:
            must_run = snap.must_run.take(rows)
            if must_run.any():
                locked = self.locked(snap, ranking, positions[~must_run], mu)
                locked[positions[must_run]] = True
                return locked
        buffer_tokens = ranking.buffer_tokens.take(rows)
        threshold = (self.mu if mu is None else mu) * snap.block[RATE].take(rows)
        maybe = buffer_tokens < threshold * ranking.gate_bound_s.take(positions)
        locked = np.zeros(ranking.order.size, dtype=bool)
        if not maybe.any():
            return locked
        positions, rows = positions[maybe], rows[maybe]
        buffer_tokens, threshold = buffer_tokens[maybe], threshold[maybe]
        gate_s = ranking.gate_s.take(positions)
        todo = np.isnan(gate_s)
        if todo.any():
            computed, synced, on_host = kv_state(list(map(snap.reqs.__getitem__, rows[todo].tolist())))
            round_trip_s, swap = preemption_costs(computed, synced, on_host, self.est, snap.page_size, snap.host_free)
            if self.churn_per_page_s:
                moved = swapped_pages(computed, synced, snap.page_size)
                round_trip_s += np.where(swap, moved * self.churn_per_page_s, 0.0)
            gate_s[todo] = round_trip_s + (self.est.pending_transfer_s + self.lead_s)
            ranking.gate_s[positions] = gate_s
        locked[positions] = buffer_tokens < threshold * gate_s
        return locked


def greedy_fill(
    snap: Snapshot, ranking: Ranking, limit: int, some_held: bool, io_budget_s: float, gate: Gate
) -> tuple[np.ndarray | None, int]:
    """Most urgent first into sequence slots (at most `limit`: W) and device pages; then every running request
    the fill left out but whose buffer cannot cover a pause takes its place back from the least urgent.
    Returns the chosen mask over positions (None: every contender) and the pages it holds."""
    capacity = snap.num_device_pages
    # Everyone fits (no one is left out): checked on totals first, with room for the loads' rounding.
    if ranking.order.size <= limit and ranking.total_load_s <= io_budget_s * (1 - 1e-9):
        total = int((snap.pages.take(ranking.order) if some_held else snap.pages).sum())
        if total <= capacity:
            return None, total
    ranking.by_position(snap, gate.est, gate.lead_s, gate.churn_per_page_s)
    pages, load_s = ranking.pages, ranking.load_s
    # The longest prefix that fits at once (slots, pages, I/O budget) is taken as a whole.
    cum_pages, cum_load = pages.cumsum(), load_s.cumsum()  # methods: numpy's wrappers cost ~2 us a call
    fits = cum_pages <= capacity
    if ranking.total_load_s:
        fits &= cum_load <= io_budget_s
    fits[limit:] = False
    if fits.all():
        return None, int(cum_pages[-1]) if pages.size else 0
    prefix = int(fits.argmin())
    chosen = np.zeros(pages.size, dtype=bool)
    chosen[:prefix] = True
    used = count = 0
    if prefix:
        used, count, io_budget_s = int(cum_pages[prefix - 1]), prefix, io_budget_s - float(cum_load[prefix - 1])
    # Beyond it, one by one (while slots are left); room and budget only shrink, so what does not fit now never
    # will.
    if count < limit:
        rest = prefix + ((pages[prefix:] <= capacity - used) & (load_s[prefix:] <= io_budget_s)).nonzero()[0]
        for k, p, load in zip(rest.tolist(), pages[rest].tolist(), load_s[rest].tolist(), strict=True):
            if count >= limit:
                break
            if used + p > capacity or load > io_budget_s:
                continue
            io_budget_s -= load
            chosen[k], used, count = True, used + p, count + 1
    # A left-out running request that cannot cover a pause comes back, pushing out the least urgent newcomers
    # and comfortable paused streams; a paused stream due back may still displace it if its buffer covers the
    # bare round trip (mu = 1), else that stream yields too (unless it comes first in fcfs's order, `rank`).
    on_device = ranking.on_device
    left_out = (~chosen & on_device).nonzero()[0]
    if not left_out.size:
        return chosen, used
    due, fcfs_rank = ranking.due, ranking.fcfs_rank
    for k in gate.locked(snap, ranking, left_out).nonzero()[0].tolist():
        p = int(pages[k])
        for may_drop_due in (False, True):
            if may_drop_due and not gate.locked(snap, ranking, np.array([k]), mu=1.0)[k]:
                break
            last = pages.size - 1
            # Overloaded, a due stream ahead of this one in fcfs's order keeps its place.
            ahead = -1.0 if not may_drop_due or fcfs_rank is None else fcfs_rank[ranking.order[k]]
            while (used + p > capacity or count >= limit) and last >= 0:
                keeps = fcfs_rank_before(fcfs_rank, ranking.order[last], ahead)
                if chosen[last] and not on_device[last] and due[last] == may_drop_due and not keeps:
                    chosen[last], used, count = False, used - int(pages[last]), count - 1
                last -= 1
            if used + p <= capacity and count < limit:
                chosen[k], used, count = True, used + p, count + 1
                break
    return chosen, used


def fcfs_rank_before(fcfs_rank: np.ndarray | None, row: int, rank: float) -> bool:
    """Whether snapshot row `row` comes before `rank` in fcfs's order (never while that order is off)."""
    return fcfs_rank is not None and fcfs_rank[row] < rank


def local_search(snap: Snapshot, ranking: Ranking, chosen: np.ndarray, used: int, iters: int, gate: Gate) -> int:
    """Adjacent swaps across the boundary, kept when the pages they free let one more request run: the first
    boundary pair (k chosen, k + 1 not, k + 1 smaller, k free to pause) after which some unchosen request fits
    the room the swap leaves (`chosen` is updated in place; returns the pages then held).

    The extra request may go past W, which bounds the fill, but not past the sequence slots. Held to W as well,
    the simulator's RTX 4090 bursts and Poisson 4/s lost 6-14% of their token throughput (fewer requests run
    while pages are free) and preempted 1.1-5x as often (docs/DESIGN.md section 7)."""
    capacity, pages = snap.num_device_pages, ranking.pages
    count = int(chosen.sum())
    # Per pair (k, k + 1) with some k + 2 after it: pages a swap frees, and whether k + 1 is the smaller.
    gain = pages[:-2] - pages[1:-1]
    smaller_next = gain > 0
    for _ in range(min(iters, snap.max_num_seqs - count)):
        boundary = (chosen[:-2] & ~chosen[1:-1] & smaller_next).nonzero()[0]
        if boundary.size:
            boundary = boundary[~gate.locked(snap, ranking, boundary).take(boundary)]
        if not boundary.size:
            break
        # The smallest unchosen request at or after each position; the room each swap would leave.
        smallest_after = np.minimum.accumulate(np.where(chosen, np.inf, pages)[::-1])[::-1]
        room = gain.take(boundary)
        room += capacity - used
        swaps = (smallest_after.take(boundary + 2) <= room).nonzero()[0]
        if not swaps.size:
            break
        k, room = int(boundary[swaps[0]]), room[swaps[0]]
        extra = k + 2 + int((~chosen[k + 2 :] & (pages[k + 2 :] <= room)).argmax())
        chosen[k], chosen[k + 1], chosen[extra] = False, True, True
        used += int(pages[k + 1] - pages[k] + pages[extra])
    return used
