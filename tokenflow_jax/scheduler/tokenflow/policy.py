"""`tokenflow`: buffer-aware preemptive scheduling (DESIGN.md section 3).

Every iteration each RUNNING request gets a decode step or its next prefill chunk, as under fcfs. Under
*stress* (a waiting queue, a paused stream, or a running stream close to running dry) the policy also decides
which requests should hold the device, at most every `reschedule_interval` and on arrivals, finishes and
resume deadlines, and (while a newcomer is left out) when a running stream's buffer should let it give way:

1. working set: at most W = (1 - lambda) floor(M / beta) + lambda * running requests run at once, where beta
   is the KV pages a live request is expected to need (prompt + output); every live request when their
   projected peak footprint fits (finishes are staggered, so it peaks below the sum of full lengths);
2. buffer balancing: candidates (running, paused, waiting) sorted by phi(b) = exp(-b seconds) descending, then
   value (the token weight the next token would earn), then rate; device pages and sequence slots are filled
   greedily, then a few adjacent swaps are tried that let more requests run. Running requests sort as if
   their buffer were `stickiness_s` smaller (no churn between near-equal buffers) and a decision plans at most
   `io_fraction` of an interval of loads;
3. admission gate: a running request may be paused for a newcomer only if its buffer covers the round trip,
   b_j >= mu r_j (t_evict + t_load + t_schedule); for a paused stream due back, mu = 1. Those left out are
   the largest buffers, and each is paused only when an entrant needs its slot (beyond W) or its pages;
4. schedulability: newcomers displace nobody while the working set's rates exceed the decode capacity Gamma
   (fcfs-like memory-aware admission only, until demand falls below `capacity_hysteresis` Gamma); and when
   even the batch memory allows cannot outpace its readers (r x step >= 1: compute-bound overload), no order
   keeps anyone fed, so the plan is exactly fcfs's.

A paused stream is due back once its reader would run dry within its load time plus a margin; it then sorts
as urgent as a newcomer. Loads are spread so one step's compute hides them. Each preemption picks swap (host
copy, reload later) or recompute, whichever the live cost estimates say is cheaper.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import operator
import time

import numpy as np

from tokenflow_jax.kv.pages import pages_for
from tokenflow_jax.reader import TAU1_FRACTION, TAU2_FRACTION
from tokenflow_jax.request import Request, RequestStatus
from tokenflow_jax.scheduler.budget import TokenBudget, admit_in_order, budget_for, write_through_order
from tokenflow_jax.scheduler.fcfs import FCFSPolicy
from tokenflow_jax.scheduler.interface import CostEstimates, Executor, SchedulerState, StepPlan
from tokenflow_jax.tracker import ARRIVAL, LAST_READ, MAX_TOKENS, NUM_GENERATED, PROMPT_LEN, RATE


@dataclasses.dataclass(frozen=True)
class TokenFlowConfig:
    """Hyperparameters, with the defaults the paper found to work."""

    reschedule_interval: float = 0.5  # s between rebalances under stress (shorter was marginally better)
    mu: float = 1.5  # buffer conservativeness >= 1: high behaves like fcfs, low is agile but risks stutter
    gamma: float = 1.0  # weight of buffer urgency phi(b) in U = v t - gamma phi(b); 0 balances by value alone
    adaptation_rate: float = 0.2  # lambda: pull of the working set W toward the current running count
    critical_buffer_s: float = 0.5  # a streaming request with less buffer than this signals stress
    resume_margin_s: float = 0.25  # resume a paused stream this long (plus its load time) before it runs dry
    local_search_iters: int = 4  # adjacent swaps tried after the greedy fill
    stickiness_s: float = 1.0  # running requests sort as if their buffer were this much smaller (less churn)
    io_fraction: float = 0.5  # swap-ins a decision plans: at most this share of an interval in load time
    capacity_hysteresis: float = 0.9  # after overload, newcomers may displace others once demand < this * Gamma
    # Gamma at the context and batch the working set will reach (True), or as measured now (False: optimistic
    # right after a burst, when contexts are short; kept to reproduce earlier figures).
    project_capacity: bool = True
    # While a newcomer is left out, re-plan as soon as a kept running stream's buffer should let it give way
    # (True), not only every reschedule_interval and on events (False: kept to reproduce earlier figures).
    replan_on_admission: bool = True
    # W covers every live request when their projected peak (all running, a token a step each, until max_tokens)
    # fits the device pages (True), not only floor(M / beta) (False: kept to reproduce earlier figures).
    fit_projected_peak: bool = True

    def __post_init__(self) -> None:
        if not self.reschedule_interval > 0:
            raise ValueError(f"reschedule_interval must be > 0 s, got {self.reschedule_interval!r}")
        if not self.mu >= 1.0:
            raise ValueError(f"mu (buffer conservativeness) must be >= 1, got {self.mu!r}")
        if not 0.0 <= self.adaptation_rate <= 1.0:
            raise ValueError(f"adaptation_rate (lambda) must be in [0, 1], got {self.adaptation_rate!r}")
        if not 0.0 < self.capacity_hysteresis <= 1.0:
            raise ValueError(f"capacity_hysteresis must be in (0, 1], got {self.capacity_hysteresis!r}")
        nonnegative = ("gamma", "critical_buffer_s", "resume_margin_s", "local_search_iters", "stickiness_s",
                       "io_fraction")  # fmt: skip
        for name in nonnegative:
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")


@dataclasses.dataclass(slots=True)
class Snapshot:
    """The live requests at a decision as arrays, in one order: running, then paused, then waiting.

    A decision weighs every live request; the tracker's columns and numpy keep it at a fraction of a
    millisecond with hundreds of requests, where a Python object per request cost ~2 us each.
    """

    reqs: list[Request]
    rids: list[str]
    num_running: int
    num_paused: int
    block: np.ndarray  # (6, n): the tracker's columns (`tracker.RATE`, ... rows)
    dry_in: np.ndarray  # seconds until the reader has read every token generated so far (0 when dry)
    context: np.ndarray  # prompt + tokens read (a token sampled but not read yet aside)
    pages: np.ndarray  # device pages each holds or needs for that context
    page_size: int

    @classmethod
    def take(cls, state: SchedulerState) -> Snapshot:
        reqs = [*state.running, *state.paused, *state.waiting]
        rids = [r.request_id for r in reqs]
        block = state.tracker.column_block(rids)
        dry_in = block[LAST_READ] - state.now
        context = block[PROMPT_LEN] + block[NUM_GENERATED]
        pages = context / state.executor.page_size
        np.ceil(pages, out=pages)  # exact: a quotient of integers is never within rounding of the next integer
        return cls(reqs, rids, len(state.running), len(state.paused), block, np.maximum(dry_in, 0.0, out=dry_in),
                   context, pages, state.executor.page_size)  # fmt: skip

    @property
    def holding_kv(self) -> int:
        """Running and paused (the working set) come first: how many."""
        return self.num_running + self.num_paused

    def buffer_tokens(self) -> np.ndarray:
        """Unread tokens (whole numbers, as floats): they are read 1/r apart up to the last one, so the buffer
        follows from the last read time."""
        tokens = self.dry_in * self.block[RATE]
        tokens -= 1e-9
        return np.ceil(tokens, out=tokens)


def token_values(buffer_tokens: np.ndarray, output_len: np.ndarray) -> np.ndarray:
    """Weight the next token would earn (DESIGN.md section 2): 1 below tau1, 0 above tau2, linear between."""
    values = np.negative(negative_token_values(buffer_tokens, output_len))
    values += 0.0  # -0.0 (from negating a clipped 0) reads as 0.0
    return values


def negative_token_values(buffer_tokens: np.ndarray, output_len: np.ndarray) -> np.ndarray:
    """-token_values (what an ascending sort wants), in as few array operations as possible."""
    tau2 = TAU2_FRACTION * output_len
    ramp = buffer_tokens - tau2
    ramp /= tau2 - TAU1_FRACTION * output_len  # <= -1 at tau1, >= 0 at tau2
    return np.maximum(np.minimum(ramp, 0.0, out=ramp), -1.0, out=ramp)


def token_value(buffer_tokens: int, output_len: int) -> float:
    return float(token_values(np.array([buffer_tokens]), np.array([output_len]))[0])


@dataclasses.dataclass(slots=True)
class Ranking:
    """Contenders most urgent first (`order`: snapshot indices), what the fill needs of them, and (once the fill
    must choose: `by_position`) the same per position in `order`."""

    order: np.ndarray
    buffer_tokens: np.ndarray  # per snapshot index
    paused_load_s: np.ndarray | None  # per paused stream: I/O budget its load spends (0 when due back)
    paused_due: np.ndarray | None  # per paused stream: its reader runs dry unless it is loaded now
    total_load_s: float  # of every contender
    pages: np.ndarray | None = None  # per position, from here on
    load_s: np.ndarray | None = None
    due: np.ndarray | None = None
    on_device: np.ndarray | None = None
    gate_s: np.ndarray | None = None  # the admission gate's time factor, NaN until computed
    gate_bound_s: np.ndarray | None = None  # an upper bound on it from the snapshot alone

    def by_position(self, snap: Snapshot, est: CostEstimates, lead_s: float) -> None:
        order, n, paused = self.order, len(snap.reqs), slice(snap.num_running, snap.holding_kv)
        load_s, due = np.zeros(n), np.zeros(n, dtype=bool)
        if self.paused_load_s is not None:
            load_s[paused], due[paused] = self.paused_load_s, self.paused_due
        self.pages, self.load_s, self.due = snap.pages.take(order), load_s.take(order), due.take(order)
        self.on_device, self.gate_s = order < snap.num_running, np.empty(order.size)
        self.gate_s.fill(np.nan)  # (np.full is a Python wrapper: several times slower)
        # The gate's round trip at most: every page out and back in (pages <= tokens / page size + 1), or
        # recomputing every token, of a context that may hold a token the host has not read yet (in flight).
        per_page = est.swap_out_per_page_s + est.swap_in_per_page_s
        per_token = max(per_page / snap.page_size, est.prefill_per_token_s) * (1 + 1e-9)  # room for rounding
        fixed = (2 * per_token + per_page + 2 * est.pending_transfer_s + lead_s) * (1 + 1e-9)
        bound = snap.context.take(order)
        bound *= per_token
        self.gate_bound_s = np.add(bound, fixed, out=bound)


class TokenFlowPolicy:
    name = "tokenflow"
    uses_write_through = True

    def __init__(self, **config: float) -> None:
        self.config = TokenFlowConfig(**config)  # an unknown key raises TypeError
        self._fcfs = FCFSPolicy()
        self.working_set: float | None = None  # W, set at each decision
        self.overloaded = False  # demand > Gamma: newcomers only take free room (hysteresis)
        self.hopeless = False  # not even the batch memory allows outpaces its readers: plan exactly as fcfs
        self.decisions = 0
        # (live requests, seconds) of the latest decisions as they ran; bounded, for a server that runs for days.
        self.decision_log: collections.deque[tuple[int, float]] = collections.deque(maxlen=100_000)
        self._desired: list[str] = []  # the last decision's running set, most urgent first
        self._rank_of: dict[str, int] | None = None  # position in `_desired` by id, built at first use after a change
        self._victims: list[str] = []  # running requests the last decision left out, most urgent first
        self._spare_rate = math.inf  # Gamma minus the working set's demand, tok/s
        self._last_decision = -math.inf
        self._admission_due = math.inf  # when a kept running stream should be able to give way to a newcomer
        self._known: tuple[int, int] | None = None  # (tracker, its membership changes) at the last check
        self._critical = False  # a running stream was below the critical buffer at the last check
        self._critical_checked = -math.inf

    # ---- costs
    @staticmethod
    def swap_cost_s(req: Request, est: CostEstimates, page_size: int) -> float:
        """t_IO: queued transfers + evicting the tail write-through has not synced + loading every page back."""
        total = pages_for(req.num_computed, page_size)
        unsynced = total - req.num_host_synced // page_size
        return est.pending_transfer_s + unsynced * est.swap_out_per_page_s + total * est.swap_in_per_page_s

    @staticmethod
    def recompute_cost_s(req: Request, est: CostEstimates) -> float:
        return req.num_computed * est.prefill_per_token_s

    def should_swap(self, req: Request, est: CostEstimates, page_size: int, host_free: int) -> bool:
        """Reload vs recompute: swap when moving the KV is cheaper than recomputing it and host pages allow."""
        host_needed = pages_for(req.num_computed, page_size) - len(req.host_pages)
        return (req.num_computed > 0 and host_needed <= host_free
                and self.swap_cost_s(req, est, page_size) <= self.recompute_cost_s(req, est))  # fmt: skip

    def resume_lead_s(self, est: CostEstimates) -> float:
        """How long before a paused reader runs dry (beyond its load time) the stream must be back."""
        return max(self.config.resume_margin_s, 2 * est.decode_step_s)

    # ---- when to decide
    def is_stressed(self, state: SchedulerState) -> bool:
        if state.waiting or state.paused:
            return True
        if state.now >= self._critical_checked + self.config.reschedule_interval:  # at decision cadence
            self._critical_checked = state.now
            self._critical = any(
                state.tracker[r.request_id].num_generated
                and state.tracker[r.request_id].buffer_seconds(state.now) < self.config.critical_buffer_s
                for r in state.running
            )
        return self._critical

    def _decision_due(self, state: SchedulerState, est: CostEstimates) -> bool:
        # An arrival or a finish: the tracker follows the live requests (a set of them per iteration cost more).
        live = (id(state.tracker), state.tracker.membership_changes)
        changed, self._known = live != self._known, live
        if changed or state.now >= min(self._last_decision + self.config.reschedule_interval, self._admission_due):
            return True
        # A paused reader is about to run dry (within its load time and the lead) and no decision has called it
        # back yet. Paused, it gets no tokens: it runs dry at its newest token's read time (at once if none).
        lead, page_size, desired = self.resume_lead_s(est), state.executor.page_size, self._ranks()
        tracker, now, per_page = state.tracker, state.now, est.swap_in_per_page_s
        for r in state.paused:
            if r.request_id not in desired:
                last_read = tracker[r.request_id].last_read_time
                if last_read is None or last_read - now <= pages_for(r.num_computed, page_size) * per_page + lead:
                    return True
        return False

    def _ranks(self) -> dict[str, int]:
        """Position of each desired request in `_desired` (entrants go in that order)."""
        if self._rank_of is None:
            self._rank_of = {rid: i for i, rid in enumerate(self._desired)}
        return self._rank_of

    # ---- the decision
    def rebalance(self, state: SchedulerState, est: CostEstimates) -> list[Request]:
        """Choose the desired running set (kept, most urgent first); return the running requests to preempt.

        Running requests sort as if their buffer were `stickiness_s` smaller, so that near-equal buffers do not
        trade places every decision, and swap-ins are capped at `io_fraction` of an interval of load time
        (streams about to run dry come back regardless).
        """
        t0 = time.perf_counter()
        ex, cfg = state.executor, self.config
        self.decisions += 1
        self._last_decision, self._admission_due = state.now, math.inf
        snap = Snapshot.take(state)
        self._adapt_working_set(snap, ex.page_size, ex.num_device_pages)
        self._update_overload(snap, ex, est)
        ranking, newcomers = self._rank(snap, est)
        gate = (est, ex.free_host_pages())
        order, rids = ranking.order, snap.rids
        chosen, used = self._greedy_fill(state, snap, ranking, newcomers.size > 0,
                                         cfg.io_fraction * cfg.reschedule_interval, gate)
        victims: list[Request] = []
        if chosen is None:  # every contender fits: nobody to pause
            self._desired = list(map(rids.__getitem__, order.tolist()))
            count = order.size
        else:
            used = self._local_search(state, snap, ranking, chosen, used, gate)
            self._desired = list(map(rids.__getitem__, order[chosen].tolist()))
            left_out = order[~chosen]
            victims = list(map(snap.reqs.__getitem__, left_out[left_out < snap.num_running].tolist()))
            # A newcomer waits (and the plan is not fcfs's, which admits by memory alone).
            if cfg.replan_on_admission and not self.hopeless and left_out.size and left_out.max() >= snap.holding_kv:
                self._admission_due = state.now + self._give_way_in_s(snap, ranking, chosen, est)
            if newcomers.size:  # they get what is left after the room left-out paused streams will need back
                left_out_paused = left_out[left_out >= snap.num_running]
                left_out_paused = left_out_paused[left_out_paused < snap.holding_kv]
                used += int(snap.pages.take(left_out_paused).sum())
                count = int(chosen.sum()) + left_out_paused.size
        if newcomers.size:
            self._fill_free_room(snap, newcomers, used, count, ex)
        self._rank_of = None
        self.decision_log.append((len(snap.reqs), time.perf_counter() - t0))
        return victims

    def _rank(self, snap: Snapshot, est: CostEstimates) -> tuple[Ranking, np.ndarray]:
        """Contenders by urgency: gamma phi(b) descending, value, rate; ties keep what is on device, then arrival.
        Newcomers held back by schedulability are returned apart (snapshot indices, arrival order)."""
        cfg, nr, npd, block = self.config, snap.num_running, snap.num_paused, snap.block
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
            paused_due = dry_in[paused] <= paused_load + self.resume_lead_s(est)
            urgency[paused][paused_due] = 0.0  # due back: as urgent as a newcomer
            paused_load[paused_due] = 0.0  # and loads regardless of the I/O budget
            total_load_s = float(paused_load.sum())
        newcomers = self._held_newcomers(snap)
        buffer_tokens = snap.buffer_tokens()
        neg_value = negative_token_values(buffer_tokens, block[MAX_TOKENS])
        off_device = np.ones(n, dtype=bool)
        off_device[:nr] = False
        order = np.lexsort((block[ARRIVAL], off_device, np.negative(block[RATE]), neg_value, urgency))
        if newcomers.size:
            contender = np.ones(n, dtype=bool)
            contender[newcomers] = False
            order = order[contender.take(order)]
        return Ranking(order, buffer_tokens, paused_load, paused_due, total_load_s), newcomers

    def _held_newcomers(self, snap: Snapshot) -> np.ndarray:
        """Newcomers (no token yet) that may not displace anyone: all while overloaded; else, in arrival order,
        those whose rate the spare capacity Gamma - demand no longer covers (snapshot indices)."""
        first_waiting = snap.holding_kv
        newcomers = (snap.block[NUM_GENERATED, first_waiting:] == 0).nonzero()[0]
        newcomers += first_waiting
        if not newcomers.size or self.overloaded:
            return newcomers
        rates, spare_rate = snap.block[RATE].take(newcomers), self._spare_rate
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

    def gate_seconds(self, reqs: list[Request], est: CostEstimates, page_size: int, host_free: int) -> np.ndarray:
        """Admission gate: a running request may pause for a newcomer only with b_j >= mu r_j (t_evict + t_load +
        t_schedule) tokens (mu = 1 for a paused stream due back). This is the time factor for many requests at
        once: the round trip (swap or recompute, as `should_swap` picks) + t_schedule, in seconds."""
        computed = np.array([r.num_computed for r in reqs], dtype=np.int64)
        synced = np.array([r.num_host_synced for r in reqs], dtype=np.int64)
        on_host = np.array([len(r.host_pages) for r in reqs], dtype=np.int64)
        total = (computed + (page_size - 1)) // page_size
        swap = (est.pending_transfer_s + (total - synced // page_size) * est.swap_out_per_page_s
                + total * est.swap_in_per_page_s)  # fmt: skip
        recompute = computed * est.prefill_per_token_s
        can_swap = (computed > 0) & (total - on_host <= host_free) & (swap <= recompute)
        return np.where(can_swap, swap, recompute) + (est.pending_transfer_s + self.resume_lead_s(est))

    def _locked(self, state: SchedulerState, snap: Snapshot, ranking: Ranking, positions: np.ndarray,
                gate: tuple[CostEstimates, int], mu: float | None = None) -> np.ndarray:
        """Which of `positions` are running with a buffer that cannot cover a pause (b < mu r t_gate), as a mask
        over positions. The exact gate reads each request's KV state, so it is computed once per position and
        only where a buffer falls short of the gate's upper bound."""
        positions = positions[ranking.on_device.take(positions)]
        rows = ranking.order.take(positions)
        buffer_tokens = ranking.buffer_tokens.take(rows)
        threshold = (self.config.mu if mu is None else mu) * snap.block[RATE].take(rows)
        maybe = buffer_tokens < threshold * ranking.gate_bound_s.take(positions)
        locked = np.zeros(ranking.order.size, dtype=bool)
        if not maybe.any():
            return locked
        positions, rows = positions[maybe], rows[maybe]
        buffer_tokens, threshold = buffer_tokens[maybe], threshold[maybe]
        gate_s = ranking.gate_s.take(positions)
        todo = np.isnan(gate_s)
        if todo.any():
            est, host_free = gate
            gate_s[todo] = self.gate_seconds(list(map(snap.reqs.__getitem__, rows[todo].tolist())), est,
                                             state.executor.page_size, host_free)  # fmt: skip
            ranking.gate_s[positions] = gate_s
        locked[positions] = buffer_tokens < threshold * gate_s
        return locked

    def _adapt_working_set(self, snap: Snapshot, page_size: int, num_device_pages: int) -> None:
        """W_static = floor(M / beta) with beta the expected pages per live request (every live request when their
        projected peak fits: `fit_projected_peak`), pulled toward the running count with rate lambda."""
        expected = int(snap.block[PROMPT_LEN:MAX_TOKENS + 1].sum()) / page_size  # prompts + max_tokens
        beta = max(1.0, expected / max(1, len(snap.reqs)))
        static = math.floor(num_device_pages / beta)
        # Everyone at full length need not fit at once: finishes are staggered, so the footprint peaks lower.
        if self.config.fit_projected_peak and static < len(snap.reqs) and (
                self.projected_peak_pages(snap) <= num_device_pages):
            static = len(snap.reqs)
        lam = self.config.adaptation_rate
        self.working_set = max(1.0, (1 - lam) * static + lam * snap.num_running)

    @staticmethod
    def projected_peak_pages(snap: Snapshot) -> float:
        """Device pages the live requests would hold at their peak if all ran from now on, one token a step each:
        the footprint grows until the first of them finishes, drops, grows again; its highest point is just before
        some finish, where the requests still running hold their contexts plus that one's remaining tokens."""
        remaining = snap.block[MAX_TOKENS] - snap.block[NUM_GENERATED]
        order = remaining.argsort(kind="stable")
        remaining, context = remaining.take(order), snap.context.take(order)
        alive = np.arange(len(order), 0, -1, dtype=np.float64)  # still running just before the j-th finish
        tokens = context[::-1].cumsum()[::-1]
        tokens += alive * remaining
        return float((tokens / snap.page_size + alive).max()) if len(order) else 0.0  # + a partial page each

    @staticmethod
    def projected_step(ex: Executor, est: CostEstimates, num_requests: int, mean_context: float) -> tuple[int, float]:
        """(sequences, seconds) of the decode step a working set will run: at the context it will hold on average
        over the rest of its generation (`mean_context`: prompt + half-way between now and max_tokens), not at
        the short contexts right after a burst (the step grows as outputs do), with as many of it in the batch
        as sequence slots and device memory allow at that context."""
        fits = max(1, int(ex.num_device_pages // pages_for(math.ceil(mean_context), ex.page_size)))
        seqs = min(num_requests, ex.max_num_seqs, fits)
        return seqs, est.decode_step_at(seqs, int(mean_context * seqs))

    def _update_overload(self, snap: Snapshot, ex: Executor, est: CostEstimates) -> None:
        """Schedulability: the working set's rates against Gamma at its projected context; hopeless when even
        its slowest reader outpaces one step of that batch (before any admission: the queue's)."""
        size = snap.holding_kv or len(snap.reqs)
        self.hopeless, seqs, step_s = False, 0, 0.0
        sums = snap.block[:, :size].sum(axis=1)
        if self.config.project_capacity and size:
            mean_context = float(sums[PROMPT_LEN] + (sums[NUM_GENERATED] + sums[MAX_TOKENS]) / 2) / size
            seqs, step_s = self.projected_step(ex, est, size, mean_context)
            self.hopeless = float(snap.block[RATE, :size].min()) * step_s >= 1.0
        if not snap.num_running:
            self.overloaded, self._spare_rate = False, math.inf
            return
        demand = float(sums[RATE])  # the working set's, here
        if self.config.project_capacity:
            capacity = seqs / max(step_s, 1e-9)
        else:  # Gamma as measured now, at the running batch and its current contexts
            capacity = est.decode_capacity_tok_s * snap.num_running / ex.max_num_seqs
        if demand > capacity:
            self.overloaded = True
        elif demand < self.config.capacity_hysteresis * capacity:
            self.overloaded = False
        self._spare_rate = capacity - demand

    def _slot_limit(self, state: SchedulerState) -> int:
        """W bounds growth by preemptive admission; it never pauses what already runs."""
        working_set = max(math.ceil(self.working_set or 1), len(state.running))
        return min(state.executor.max_num_seqs, working_set)

    def _greedy_fill(self, state: SchedulerState, snap: Snapshot, ranking: Ranking, some_held: bool,
                     io_budget_s: float, gate: tuple[CostEstimates, int]) -> tuple[np.ndarray | None, int]:
        """Most urgent first into sequence slots (at most W) and device pages; then every running request the
        fill left out but whose buffer cannot cover a pause takes its place back from the least urgent.
        Returns the chosen mask over positions (None: every contender) and the pages it holds."""
        limit, capacity = self._slot_limit(state), state.executor.num_device_pages
        # Everyone fits (no one is left out): checked on totals first, with room for the loads' rounding.
        if ranking.order.size <= limit and ranking.total_load_s <= io_budget_s * (1 - 1e-9):
            total = int((snap.pages.take(ranking.order) if some_held else snap.pages).sum())
            if total <= capacity:
                return None, total
        ranking.by_position(snap, gate[0], self.resume_lead_s(gate[0]))
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
        # Beyond it, one by one (while slots are left); room and budget only shrink, so what does not fit now
        # never will.
        if count < limit:
            rest = prefix + ((pages[prefix:] <= capacity - used) & (load_s[prefix:] <= io_budget_s)).nonzero()[0]
            for k, p, load in zip(rest.tolist(), pages[rest].tolist(), load_s[rest].tolist(), strict=True):
                if count >= limit:
                    break
                if used + p > capacity or load > io_budget_s:
                    continue
                io_budget_s -= load
                chosen[k], used, count = True, used + p, count + 1
        # A left-out running request that cannot cover a pause comes back, pushing out the least urgent
        # newcomers and comfortable paused streams; a paused stream due back may still displace it if its
        # buffer covers the bare round trip (mu = 1), else that stream yields too.
        on_device = ranking.on_device
        left_out = (~chosen & on_device).nonzero()[0]
        if not left_out.size:
            return chosen, used
        due = ranking.due
        locked = self._locked(state, snap, ranking, left_out, gate)
        for k in locked.nonzero()[0].tolist():
            p = int(pages[k])
            for may_drop_due in (False, True):
                if may_drop_due and not self._locked(state, snap, ranking, np.array([k]), gate, mu=1.0)[k]:
                    break
                last = pages.size - 1
                while (used + p > capacity or count >= limit) and last >= 0:
                    if chosen[last] and not on_device[last] and due[last] == may_drop_due:
                        chosen[last], used, count = False, used - int(pages[last]), count - 1
                    last -= 1
                if used + p <= capacity and count < limit:
                    chosen[k], used, count = True, used + p, count + 1
                    break
        return chosen, used

    def _local_search(self, state: SchedulerState, snap: Snapshot, ranking: Ranking, chosen: np.ndarray,
                      used: int, gate: tuple[CostEstimates, int]) -> int:
        """Adjacent swaps across the boundary, kept when the pages they free let one more request run: the first
        boundary pair (k chosen, k + 1 not, k + 1 smaller, k free to pause) after which some unchosen request
        fits the room the swap leaves (`chosen` is updated in place; returns the pages then held).

        The extra request may go past W, which bounds the fill, but not past the sequence slots. Held to W as
        well, the simulator's RTX 4090 bursts and Poisson 4/s lost 6-14% of their token throughput (fewer
        requests run while pages are free) and preempted 1.1-5x as often (BENCHMARKS.md)."""
        capacity, pages = state.executor.num_device_pages, ranking.pages
        count = int(chosen.sum())
        # Per pair (k, k + 1) with some k + 2 after it: pages a swap frees, and whether k + 1 is the smaller.
        gain = pages[:-2] - pages[1:-1]
        smaller_next = gain > 0
        for _ in range(min(self.config.local_search_iters, state.executor.max_num_seqs - count)):
            boundary = (chosen[:-2] & ~chosen[1:-1] & smaller_next).nonzero()[0]
            if boundary.size:
                boundary = boundary[~self._locked(state, snap, ranking, boundary, gate).take(boundary)]
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
            extra = k + 2 + int((~chosen[k + 2:] & (pages[k + 2:] <= room)).argmax())
            chosen[k], chosen[k + 1], chosen[extra] = False, True, True
            used += int(pages[k + 1] - pages[k] + pages[extra])
        return used

    def _give_way_in_s(self, snap: Snapshot, ranking: Ranking, chosen: np.ndarray, est: CostEstimates) -> float:
        """Seconds until the first stream the fill kept (running or entering) could give way to a newcomer: once
        running, its buffer grows by a token per decode step less what its reader takes, until it is past where it
        sorts after a newcomer (stickiness_s of buffer, or tau1 tokens: a lower value) and past its admission gate
        (mu x the round trip; the gate's bound where the fill did not need the exact one). Streams already past
        both are kept for other reasons and not counted, so a decision that cannot admit does not call the next
        one at once."""
        positions = chosen.nonzero()[0]
        rows = ranking.order.take(positions)
        rate, dry_in = snap.block[RATE].take(rows), snap.dry_in.take(rows)
        sorts_after = snap.block[MAX_TOKENS].take(rows)
        sorts_after *= TAU1_FRACTION
        sorts_after /= rate
        np.minimum(sorts_after, self.config.stickiness_s, out=sorts_after)
        gate_s = np.fmin(ranking.gate_s.take(positions), ranking.gate_bound_s.take(positions))  # NaN: not computed
        short_s = np.maximum(sorts_after, self.config.mu * gate_s, out=gate_s)
        short_s -= dry_in
        gain = 1.0 / (rate * max(est.decode_step_s, 1e-9))  # buffer seconds a second of running adds
        gain -= 1.0  # less the second its reader reads
        growing = (short_s > 0) & (gain > 0)
        if not growing.any():
            return math.inf
        return max(float((short_s[growing] / gain[growing]).min()), est.decode_step_s)

    def _fill_free_room(self, snap: Snapshot, newcomers: np.ndarray, used: int, count: int, ex: Executor) -> None:
        """Newcomers held back by schedulability take whatever room is left, in arrival order (fcfs: as memory
        allows now, beyond W), after the `used` pages and `count` slots the working set holds or will need back."""
        new_pages = snap.pages.take(newcomers)
        fits = used + new_pages.cumsum() <= ex.num_device_pages
        fits[max(0, ex.max_num_seqs - count):] = False
        admitted = len(newcomers) if fits.all() else int(fits.argmin())
        self._desired += list(map(snap.rids.__getitem__, newcomers[:admitted].tolist()))

    # ---- the iteration's plan
    def plan(self, state: SchedulerState) -> StepPlan:
        est = state.executor.estimates()
        if not self.is_stressed(state):
            self._desired, self._victims, self._rank_of = [], [], None
            return self._schedule(state, est, [], [], fcfs=True)
        if self._decision_due(state, est):
            self._victims = [r.request_id for r in self.rebalance(state, est)]
        if self.hopeless:
            self._desired, self._victims, self._rank_of = [], [], None
            return self._fcfs.plan(state)
        order = {rid: i for i, rid in enumerate(self._victims)}
        victims = sorted((r for r in state.running if r.request_id in order), key=lambda r: order[r.request_id])
        rank = self._ranks()
        entrants = sorted((r for r in (*state.paused, *state.waiting) if r.request_id in rank),
                          key=lambda r: rank[r.request_id])  # fmt: skip
        return self._schedule(state, est, victims, entrants, fcfs=False)

    def _schedule(self, state: SchedulerState, est: CostEstimates, victims: list[Request],
                  entrants: list[Request], *, fcfs: bool) -> StepPlan:
        """Every running request steps; entrants follow in urgency order; newcomers too in fcfs mode. A victim
        of the decision is preempted only when an entrant (or a page shortage) needs its room this step."""
        plan = StepPlan()
        budget = budget_for(state)
        host_free = [state.executor.free_host_pages()]
        # Pausing is instant but loads trickle in a step at a time: pausing ahead of need only shrinks the batch.
        pending = list(victims)  # least urgent last: popped first
        gone: set[str] = set()
        taken: dict[str, int] = {}  # pages each scheduled request takes this step

        def preempt(victim: Request) -> None:
            if victim.request_id in plan.schedule:  # already stepped this iteration: undo that
                budget.tokens += plan.schedule.pop(victim.request_id)
                budget.seqs += 1
                budget.pages += taken.pop(victim.request_id)
            self._preempt(state, plan, budget, victim, est, host_free)
            gone.add(victim.request_id)
            if victim in pending:
                pending.remove(victim)

        running = list(state.running)
        for req in running:
            if req.request_id in gone:
                continue
            n, pages = budget.chunk(state, req)
            if n <= 0 or budget.seqs <= 0:
                continue
            while pages > budget.pages:  # out of pages mid-decode: the decision's victims go first
                staying = [r for r in running if r.request_id not in gone]
                # Unschedulable: nobody can be kept fed, so do as fcfs does (the latest admitted yields) rather
                # than rotate the largest buffer out and back in, which only adds transfers.
                victim = pending[-1] if pending else (
                    staying[-1] if self.overloaded else self._largest_buffer(state, staying))
                preempt(victim)
                if victim is req:
                    break
            if req.request_id not in gone:
                budget.take(plan, req, n, pages)
                taken[req.request_id] = pages
        load_budget_s = est.decode_step_s  # loads that one step of compute hides; the rest wait a step
        # W: an entrant beyond it takes a victim's slot; overloaded, only memory does (fill it, as fcfs would).
        slots, entered = state.executor.max_num_seqs if self.overloaded else math.ceil(self.working_set or 1), 0
        for req in entrants:
            load_s = 0.0
            if req.status is RequestStatus.PAUSED:
                load_s = pages_for(req.num_computed, state.executor.page_size) * est.swap_in_per_page_s
                if plan.swap_in and load_s > load_budget_s:
                    continue
            n, pages = budget.chunk(state, req)
            room = budget.pages + sum(len(v.device_pages) for v in pending)
            while pending and pages <= room and (budget.seqs <= 0 or pages > budget.pages
                                                 or len(state.running) - len(gone) + entered >= slots):
                preempt(pending[-1])
            n, pages = budget.chunk(state, req)
            if budget.seqs <= 0 or n <= 0 or pages > budget.pages:
                continue
            if req.status is RequestStatus.PAUSED:
                load_budget_s -= load_s
                plan.swap_in.append(req.request_id)
            budget.take(plan, req, n, pages)
            taken[req.request_id] = pages
            entered += 1
        if plan.swap_out and pending:  # a swap-out waits for the copy engine's backlog: pay that once per step
            for _ in range(min(len(pending), sum(r.request_id not in plan.schedule for r in entrants))):
                preempt(pending[-1])
        if fcfs:
            admit_in_order(state, plan, budget, list(state.waiting))
        plan.sync_order = write_through_order(state, plan)
        return plan

    @staticmethod
    def _largest_buffer(state: SchedulerState, running: list[Request]) -> Request:
        return max(running, key=lambda r: (state.tracker[r.request_id].buffer_tokens(state.now) / r.rate,
                                           r.admitted_order))  # fmt: skip

    def _preempt(self, state: SchedulerState, plan: StepPlan, budget: TokenBudget, req: Request,
                 est: CostEstimates, host_free: list[int]) -> None:
        page_size = state.executor.page_size
        if self.should_swap(req, est, page_size, host_free[0]):
            plan.swap_out.append(req.request_id)
            host_free[0] -= max(0, pages_for(req.num_computed, page_size) - len(req.host_pages))
        else:
            plan.recompute_out.append(req.request_id)
        budget.pages += len(req.device_pages)
        if self._ranks().pop(req.request_id, None) is not None:
            self._desired.remove(req.request_id)
