"""`tokenflow`: buffer-aware preemptive scheduling (DESIGN.md section 3).

Every iteration each RUNNING request gets a decode step or its next prefill chunk, as under fcfs. Under
*stress* (a waiting queue, a paused stream, or a running stream close to running dry) the policy also decides
which requests should hold the device, at most every `reschedule_interval` and on arrivals, finishes and
resume deadlines:

1. working set: at most W = (1 - lambda) floor(M / beta) + lambda * running requests run at once, where beta
   is the KV pages a live request is expected to need (prompt + output);
2. buffer balancing: candidates (running, paused, waiting) sorted by phi(b) = exp(-b seconds) descending, then
   value (the token weight the next token would earn), then rate; device pages and sequence slots are filled
   greedily, then a few adjacent swaps are tried that let more requests run. Running requests sort as if
   their buffer were `stickiness_s` smaller (no churn between near-equal buffers) and a decision plans at most
   `io_fraction` of an interval of loads;
3. admission gate: a running request may be paused for a newcomer only if its buffer covers the round trip,
   b_j >= mu r_j (t_evict + t_load + t_schedule); for a paused stream due back, mu = 1. Those left out are
   the largest buffers;
4. schedulability: newcomers displace nobody while the working set's rates exceed the decode capacity Gamma
   (fcfs-like memory-aware admission only, until demand falls below `capacity_hysteresis` Gamma).

A paused stream is due back once its reader would run dry within its load time plus a margin; it then sorts
as urgent as a newcomer. Loads are spread so one step's compute hides them. Each preemption picks swap (host
copy, reload later) or recompute, whichever the live cost estimates say is cheaper.
"""

from __future__ import annotations

import dataclasses
import math

from tokenflow_jax.metrics import TAU1_FRACTION, TAU2_FRACTION
from tokenflow_jax.scheduler.fcfs import TokenBudget, admit_in_order, budget_for
from tokenflow_jax.scheduler.interface import CostEstimates, SchedulerState, StepPlan, pages_for
from tokenflow_jax.scheduler.request import Request, RequestStatus


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
class Candidate:
    """One request as buffer balancing sees it at a decision."""

    req: Request
    buffer_tokens: int
    pages: int  # device pages it needs to run its next step
    locked: bool | None = None  # running, and its buffer cannot cover a pause (None: not evaluated yet)
    load_s: float = 0.0  # paused: time to load its pages back
    due: bool = False  # paused, and its reader runs dry unless it is loaded now
    key: tuple = ()  # urgency: gamma phi(b) descending, value, rate; ties keep what is on device, then arrival

    @property
    def on_device(self) -> bool:
        return self.req.status is RequestStatus.RUNNING


def token_value(buffer_tokens: int, output_len: int) -> float:
    """Weight the next token would earn (DESIGN.md section 2): 1 below tau1, 0 above tau2, linear between."""
    tau1, tau2 = TAU1_FRACTION * output_len, TAU2_FRACTION * output_len
    if buffer_tokens <= tau1:
        return 1.0
    return 0.0 if buffer_tokens >= tau2 else (tau2 - buffer_tokens) / (tau2 - tau1)


class TokenFlowPolicy:
    name = "tokenflow"

    def __init__(self, **config: float) -> None:
        self.config = TokenFlowConfig(**config)  # an unknown key raises TypeError
        self.working_set: float | None = None  # W, set at each decision
        self.overloaded = False  # demand > Gamma: newcomers only take free room (hysteresis)
        self.decisions = 0
        self._desired: list[str] = []  # the last decision's running set, most urgent first
        self._spare_rate = math.inf  # Gamma minus the working set's demand, tok/s
        self._used = (0, 0)  # (pages, sequences) the decision has handed out so far
        self._last_decision = -math.inf
        self._known: set[str] = set()
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

    def pause_threshold_tokens(self, req: Request, est: CostEstimates, page_size: int, host_free: int,
                               mu: float | None = None) -> float:
        """Admission gate: a running request may pause for a newcomer only with
        b_j >= mu r_j (t_evict + t_load + t_schedule) tokens (mu = 1 for a paused stream due back)."""
        if self.should_swap(req, est, page_size, host_free):
            round_trip = self.swap_cost_s(req, est, page_size)
        else:
            round_trip = self.recompute_cost_s(req, est)
        t_schedule = est.pending_transfer_s + self.resume_lead_s(est)
        return (self.config.mu if mu is None else mu) * req.rate * (round_trip + t_schedule)

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
        live = {r.request_id for group in (state.waiting, state.running, state.paused) for r in group}
        changed, self._known = live != self._known, live  # an arrival or a finish
        if changed or state.now >= self._last_decision + self.config.reschedule_interval:
            return True
        lead, page_size, desired = self.resume_lead_s(est), state.executor.page_size, set(self._desired)
        return any(
            state.tracker[r.request_id].time_until_dry(state.now)
            <= pages_for(r.num_computed, page_size) * est.swap_in_per_page_s + lead
            for r in state.paused if r.request_id not in desired
        )  # a paused reader is about to run dry and no decision has called it back yet

    # ---- the decision
    def rebalance(self, state: SchedulerState, est: CostEstimates) -> list[Request]:
        """Choose the desired running set (kept, most urgent first); return the running requests to preempt.

        Running requests sort as if their buffer were `stickiness_s` smaller, so that near-equal buffers do not
        trade places every decision, and swap-ins are capped at `io_fraction` of an interval of load time
        (streams about to run dry come back regardless).
        """
        ex, now, tracker, cfg = state.executor, state.now, state.tracker, self.config
        self.decisions += 1
        self._last_decision = now
        page_size, gamma, stickiness = ex.page_size, cfg.gamma, cfg.stickiness_s
        self._adapt_working_set(state)
        self._update_overload(state, est)
        lead, load_per_page = self.resume_lead_s(est), est.swap_in_per_page_s
        contenders: list[Candidate] = []  # compete by urgency; may displace running requests
        newcomers: dict[int, Candidate] = {}  # held back by schedulability: free room only, in arrival order
        spare_rate = self._spare_rate
        running = RequestStatus.RUNNING
        for req in (*state.running, *state.paused, *state.waiting):
            last_read = tracker[req.request_id].last_read_time
            dry_in = last_read - now if last_read is not None and last_read > now else 0.0
            # Unread tokens are read 1/r apart up to the last one, so the buffer follows from its read time.
            rate, status = req.rate, req.status
            c = Candidate(req, math.ceil(dry_in * rate - 1e-9), -(-req.num_tokens // page_size))
            sort_buffer_s = dry_in
            if status is running:
                sort_buffer_s = dry_in - stickiness if dry_in > stickiness else 0.0
            elif status is RequestStatus.PAUSED:
                c.load_s = c.pages * load_per_page
                c.due = dry_in <= c.load_s + lead
                sort_buffer_s = 0.0 if c.due else dry_in  # due back now: as urgent as a newcomer
            elif not req.output_ids:
                if self.overloaded or rate > spare_rate:
                    newcomers[id(req)] = c  # may displace others only while everyone stays schedulable
                    continue
                spare_rate -= rate
            # gamma phi(b) descending (b ascending for gamma > 0), then value, then rate; then keep what runs.
            phi = gamma * math.exp(-sort_buffer_s)
            c.key = (-phi, -token_value(c.buffer_tokens, req.sampling.max_tokens), -rate, status is not running,
                     req.arrival)  # fmt: skip
            contenders.append(c)
        contenders.sort(key=lambda c: c.key)
        gate = (est, ex.free_host_pages())
        chosen = self._greedy_fill(state, contenders, cfg.io_fraction * cfg.reschedule_interval, gate)
        self._local_search(state, contenders, chosen, gate)
        self._desired = [c.req.request_id for c, keep in zip(contenders, chosen, strict=True) if keep]
        self._fill_free_room(state, newcomers)
        return [c.req for c, keep in zip(contenders, chosen, strict=True) if not keep and c.req.status is running]

    def _is_locked(self, state: SchedulerState, c: Candidate, gate: tuple[CostEstimates, int],
                   mu: float | None = None) -> bool:
        """Running and unable to cover a pause (evaluated only for those the fill would leave out)."""
        if mu is not None or c.locked is None:
            est, host_free = gate
            threshold = self.pause_threshold_tokens(c.req, est, state.executor.page_size, host_free, mu)
            locked = c.on_device and c.buffer_tokens < threshold
            if mu is not None:
                return locked
            c.locked = locked
        return c.locked

    def _adapt_working_set(self, state: SchedulerState) -> None:
        """W_static = floor(M / beta) with beta the expected pages per live request, pulled toward the running
        count with rate lambda."""
        live = (*state.running, *state.paused, *state.waiting)
        expected = sum(len(r.prompt_ids) + r.sampling.max_tokens for r in live) / state.executor.page_size
        beta = max(1.0, expected / max(1, len(live)))
        static = math.floor(state.executor.num_device_pages / beta)
        lam = self.config.adaptation_rate
        self.working_set = max(1.0, (1 - lam) * static + lam * len(state.running))

    @staticmethod
    def projected_capacity(state: SchedulerState, est: CostEstimates, working_set: list[Request]) -> float:
        """Gamma for the working set: tokens/s a decode batch of it sustains at the context it will hold on
        average over the rest of its generation (prompt + half-way between now and max_tokens), not at the
        short contexts right after a burst (the step grows as outputs do), with as many of it in the batch
        as sequence slots and device memory allow at that context."""
        ex = state.executor
        mean_context = sum(len(r.prompt_ids) + (len(r.output_ids) + r.sampling.max_tokens) / 2
                           for r in working_set) / len(working_set)  # fmt: skip
        fits = max(1, int(ex.num_device_pages // pages_for(math.ceil(mean_context), ex.page_size)))
        seqs = min(len(working_set), ex.max_num_seqs, fits)
        return seqs / max(est.decode_step_at(seqs, int(mean_context * seqs)), 1e-9)

    def _update_overload(self, state: SchedulerState, est: CostEstimates) -> None:
        """Schedulability: the working set's rates against Gamma at its projected context."""
        if not state.running:
            self.overloaded, self._spare_rate = False, math.inf
            return
        working_set = [*state.running, *state.paused]
        demand = sum(r.rate for r in working_set)
        if self.config.project_capacity:
            capacity = self.projected_capacity(state, est, working_set)
        else:  # Gamma as measured now, at the running batch and its current contexts
            capacity = est.decode_capacity_tok_s * len(state.running) / state.executor.max_num_seqs
        if demand > capacity:
            self.overloaded = True
        elif demand < self.config.capacity_hysteresis * capacity:
            self.overloaded = False
        self._spare_rate = capacity - demand

    def _slot_limit(self, state: SchedulerState) -> int:
        """W bounds growth by preemptive admission; it never pauses what already runs."""
        working_set = max(math.ceil(self.working_set or 1), len(state.running))
        return min(state.executor.max_num_seqs, working_set)

    def _greedy_fill(self, state: SchedulerState, order: list[Candidate], io_budget_s: float,
                     gate: tuple[CostEstimates, int]) -> list[bool]:
        """Most urgent first into sequence slots (at most W) and device pages; then every running request the
        fill left out but whose buffer cannot cover a pause takes its place back from the least urgent."""
        limit, capacity = self._slot_limit(state), state.executor.num_device_pages
        chosen = [False] * len(order)
        pages = count = 0
        for i, c in enumerate(order):
            if count >= limit or pages + c.pages > capacity:
                continue
            if c.load_s and not c.due:
                if c.load_s > io_budget_s:
                    continue  # the load engine is spoken for this interval
                io_budget_s -= c.load_s
            chosen[i], pages, count = True, pages + c.pages, count + 1
        # A left-out running request that cannot cover a pause comes back, pushing out the least urgent
        # newcomers and comfortable paused streams; a paused stream due back may still displace it if its
        # buffer covers the bare round trip (mu = 1), else that stream yields too.
        for i, c in enumerate(order):
            if chosen[i] or not c.on_device or not self._is_locked(state, c, gate):
                continue
            for may_drop_due in (False, True):
                if may_drop_due and not self._is_locked(state, c, gate, mu=1.0):
                    break
                last = len(order) - 1
                while (pages + c.pages > capacity or count >= limit) and last >= 0:
                    d = order[last]
                    if chosen[last] and not d.on_device and d.due == may_drop_due:
                        chosen[last], pages, count = False, pages - d.pages, count - 1
                    last -= 1
                if pages + c.pages <= capacity and count < limit:
                    chosen[i], pages, count = True, pages + c.pages, count + 1
                    break
        self._used = pages, count
        return chosen

    def _fill_free_room(self, state: SchedulerState, newcomers: dict[int, Candidate]) -> None:
        """Newcomers held back by schedulability take whatever room is left, in arrival order (fcfs: as memory
        allows now, beyond W)."""
        limit, capacity = state.executor.max_num_seqs, state.executor.num_device_pages
        pages, count = self._used
        desired = set(self._desired)
        for req in state.paused:  # the working set's paused streams will need their room back
            if req.request_id not in desired:
                pages, count = pages + pages_for(req.num_tokens, state.executor.page_size), count + 1
        for req in state.waiting:
            c = newcomers.get(id(req))
            if c is None:
                continue
            if count >= limit or pages + c.pages > capacity:
                break
            pages, count = pages + c.pages, count + 1
            self._desired.append(req.request_id)

    def _local_search(self, state: SchedulerState, order: list[Candidate], chosen: list[bool],
                      gate: tuple[CostEstimates, int]) -> None:
        """Adjacent swaps across the boundary, kept when the pages they free let one more request run."""
        capacity = state.executor.num_device_pages
        pages, count = self._used
        for _ in range(self.config.local_search_iters):
            improved = False
            for i in range(len(order) - 1):
                a, b = order[i], order[i + 1]
                if not chosen[i] or chosen[i + 1] or b.pages >= a.pages or self._is_locked(state, a, gate):
                    continue
                room = capacity - (pages - a.pages + b.pages)
                extra = next((j for j in range(i + 2, len(order)) if not chosen[j] and order[j].pages <= room), None)
                if extra is not None:
                    chosen[i], chosen[i + 1], chosen[extra] = False, True, True
                    pages += b.pages - a.pages + order[extra].pages
                    count += 1
                    improved = True
                    break
            if not improved:
                break
        self._used = pages, count

    # ---- the iteration's plan
    def plan(self, state: SchedulerState) -> StepPlan:
        est = state.executor.estimates()
        if not self.is_stressed(state):
            self._desired = []
            return self._schedule(state, est, [], [], fcfs=True)
        victims: list[Request] = []
        if self._decision_due(state, est):
            victims = self.rebalance(state, est)
        rank = {rid: i for i, rid in enumerate(self._desired)}
        entrants = sorted((r for r in (*state.paused, *state.waiting) if r.request_id in rank),
                          key=lambda r: rank[r.request_id])  # fmt: skip
        return self._schedule(state, est, victims, entrants, fcfs=False)

    def _schedule(self, state: SchedulerState, est: CostEstimates, victims: list[Request],
                  entrants: list[Request], *, fcfs: bool) -> StepPlan:
        """Every running request steps; entrants follow in urgency order; newcomers too in fcfs mode."""
        plan = StepPlan()
        budget = budget_for(state)
        host_free = [state.executor.free_host_pages()]
        for req in victims:
            self._preempt(state, plan, budget, req, est, host_free)
        gone = set(plan.swap_out) | set(plan.recompute_out)
        running = [r for r in state.running if r.request_id not in gone]
        taken: dict[str, int] = {}  # pages each scheduled request takes this step
        for req in running:
            if req.request_id in gone:
                continue
            n, pages = budget.chunk(state, req)
            if n <= 0 or budget.seqs <= 0:
                continue
            while pages > budget.pages:  # out of pages mid-decode: the largest buffer goes
                staying = [r for r in running if r.request_id not in gone]
                # Unschedulable: nobody can be kept fed, so do as fcfs does (the latest admitted yields) rather
                # than rotate the largest buffer out and back in, which only adds transfers.
                victim = staying[-1] if self.overloaded else self._largest_buffer(state, staying)
                if victim.request_id in plan.schedule:  # already stepped this iteration: undo that
                    budget.tokens += plan.schedule.pop(victim.request_id)
                    budget.seqs += 1
                    budget.pages += taken.pop(victim.request_id)
                self._preempt(state, plan, budget, victim, est, host_free)
                gone.add(victim.request_id)
                if victim is req:
                    break
            if req.request_id not in gone:
                budget.take(plan, req, n, pages)
                taken[req.request_id] = pages
        load_budget_s = est.decode_step_s  # loads that one step of compute hides; the rest wait a step
        for req in entrants:
            n, pages = budget.chunk(state, req)
            if budget.seqs <= 0 or n <= 0 or pages > budget.pages:
                continue
            if req.status is RequestStatus.PAUSED:
                load_s = pages_for(req.num_computed, state.executor.page_size) * est.swap_in_per_page_s
                if plan.swap_in and load_s > load_budget_s:
                    continue
                load_budget_s -= load_s
                plan.swap_in.append(req.request_id)
            budget.take(plan, req, n, pages)
        if fcfs:
            admit_in_order(state, plan, budget, list(state.waiting))
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
        if req.request_id in self._desired:
            self._desired.remove(req.request_id)
