"""`TokenFlowPolicy`: each iteration, stress, then (when one is due) a decision, then this step's plan."""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Sequence

from tokenflow_jax.estimators import DecayingPeak
from tokenflow_jax.kv.pages import pages_for
from tokenflow_jax.reader import TAU1_FRACTION
from tokenflow_jax.request import Request, RequestStatus
from tokenflow_jax.scheduler.budget import admission_queue, admit_in_order, budget_for, write_through_order
from tokenflow_jax.scheduler.fcfs import FCFSPolicy
from tokenflow_jax.scheduler.interface import CostEstimates, SchedulerState, StepPlan
from tokenflow_jax.scheduler.tokenflow.config import TokenFlowConfig
from tokenflow_jax.scheduler.tokenflow.costs import preemption_costs_of
from tokenflow_jax.scheduler.tokenflow.decision import Decision, decide
from tokenflow_jax.scheduler.tokenflow.rateless_step import (
    held_back,
    leave_out,
    planned_chunks,
    running_chunks,
    sitting_out,
    slots_short,
)
from tokenflow_jax.scheduler.tokenflow.snapshot import Snapshot
from tokenflow_jax.scheduler.tokenflow.timing import DecisionClock


class TokenFlowPolicy:
    """Buffer-aware preemptive scheduling (docs/DESIGN.md section 3; the package docstring sums it up)."""

    name = "tokenflow"
    uses_write_through = True

    def __init__(self, **config: float) -> None:
        self.config = TokenFlowConfig(**config)  # an unknown key raises TypeError
        self.clock = DecisionClock(self.config)
        self.decision: Decision | None = None  # the last decision taken
        self.decisions = 0
        # (live requests, seconds) of the latest decisions as they ran; bounded, for a server that runs for days.
        self.decision_log: collections.deque[tuple[int, float]] = collections.deque(maxlen=100_000)
        # The decision in force: its running set by urgency, less what has been paused since; its victims.
        self._wanted: dict[str, int] = {}
        self._victims: tuple[str, ...] = ()
        self._fcfs = StreamsFirstFCFS(self.config.max_hold_s)
        # Started streams a decision called back (paused, or waiting to recompute) -> when: how long a call-back
        # takes to run (`resume_delay`, a recent peak) widens the resume lead, since due streams queue for loads.
        self._called_back: dict[str, tuple[Request, float]] = {}
        self.resume_delay = DecayingPeak()
        # (time, Gamma) of the decisions of the last `overload_clear_s`: an overload clears below their lowest.
        self._capacities: collections.deque[tuple[float, float]] = collections.deque()
        self._overload_since = math.inf  # when the overload in force began
        # Rate-less requests held back `max_hold_s`: they must run until their next token (tokens when marked).
        self._must_run: dict[str, Request] = {}
        self._must_run_tokens: dict[str, int] = {}

    def plan(self, state: SchedulerState) -> StepPlan:
        est = state.executor.estimates()
        if self._called_back:
            self._note_resumes(state)
        if not self.clock.stressed(state):  # no stress: fcfs's admission, no decision in force
            self._wanted, self._victims = {}, ()
            return self._schedule(state, est, [], [], fcfs=True)
        if self.clock.due(state, est, self._wanted, self.slack_s(state)):
            self.rebalance(state, est)
        if self.decision is not None and self.decision.as_fcfs:  # no order keeps anyone fed, or no room: fcfs
            self._wanted, self._victims = {}, ()
            return self._fcfs_plan(state, est)
        # This step: everyone running steps; entrants come in by urgency, taking a victim's room only if needed.
        order = {rid: i for i, rid in enumerate(self._victims)}
        victims = sorted((r for r in state.running if r.request_id in order), key=lambda r: order[r.request_id])
        rank = self._wanted
        entrants = sorted((r for r in (*state.paused, *state.waiting) if r.request_id in rank),
                          key=lambda r: rank[r.request_id])  # fmt: skip
        return self._schedule(state, est, victims, entrants, fcfs=False)

    def _fcfs_plan(self, state: SchedulerState, est: CostEstimates) -> StepPlan:
        """fcfs's plan, but rate-less requests share the step only while it stays within the streams' readers'
        period (`rateless_step`): those that sit it out are weighed first, and while some do, no other rate-less
        request is admitted (unless held back `max_hold_s`) and those sitting out that the plan takes sequence
        slots from are paused (KV to the host tier), so that the slots go to the streams. Running rate-less
        requests not bound to run also yield the room of started streams waiting to run again (`_yielding`)."""
        hold_s, fraction = self.config.max_hold_s, self.config.rateless_step_fraction
        idle = sitting_out(running_chunks(state), state, est, hold_s, fraction)
        # Only for want of room: where no order keeps the readers fed (hopeless), yielding only moves the stall.
        yielding = [] if self.decision.hopeless else self._yielding(state, idle)
        self._fcfs.rateless_wait = bool(idle) or bool(yielding)
        if not idle and not yielding:
            plan = self._fcfs.plan(state)
        else:
            gone = {r.request_id for r in yielding}
            stepping = [r for r in state.running if r.request_id not in idle and r.request_id not in gone]
            plan = self._fcfs.plan(dataclasses.replace(state, running=stepping))
            fill = StepFill(state, est, (), plan)
            for req in yielding:
                fill.preempt(req)
            running = {r.request_id: r for r in state.running}
            for rid in idle[: slots_short(plan, state)]:
                fill.preempt(running[rid])
        leave_out(plan, sitting_out(planned_chunks(plan, state), state, est, hold_s, fraction))
        return plan

    def _yielding(self, state: SchedulerState, idle: Sequence[str]) -> list[Request]:
        """Running rate-less requests (not held back `max_hold_s`) whose device pages or sequence slots the started
        streams waiting to run again (paused, or to recompute) need, in fcfs's queue order: the latest admitted
        yields first, and only for a stream it lets back in."""
        tracker, hold_s = state.tracker, self.config.max_hold_s
        back = [r for r in admission_queue(state) if r.rate is not None and tracker[r.request_id].num_generated]
        if not back:
            return []
        candidates = sorted(
            (r for r in state.running if r.rate is None and r.request_id not in idle
             and r.request_id not in self._must_run and not held_back(state, r, hold_s)),
            key=lambda r: r.admitted_order, reverse=True)  # fmt: skip
        if not candidates:
            return []
        budget = budget_for(state)
        free, slots = budget.pages, budget.seqs - len(state.running)
        out: list[Request] = []
        for req in back:
            _, need = budget.chunk(state, req)
            take, f, sl = 0, free, slots
            while (f < need or sl < 1) and take < len(candidates):
                f += state.pages_freed_by(candidates[take])
                sl += 1
                take += 1
            if f < need or sl < 1:
                break
            out += candidates[:take]
            del candidates[:take]
            free, slots = f - need, sl - 1
        return out

    def _keep_must_run(self, state: SchedulerState) -> None:
        """Release the must-run requests that finished or made a token since they were marked: the hold bounds the
        wait between tokens, no more. Kept longer (for `max_hold_s` once in), a crowd of rate-less requests under
        an overload ran half of every hold and kept the streams' room (docs/DESIGN.md 3.16)."""
        tracker, marked = state.tracker, self._must_run_tokens
        self._must_run = {rid: r for rid, r in self._must_run.items()
                          if r.status is not RequestStatus.FINISHED and rid in tracker
                          and tracker[rid].num_generated <= marked[rid]}  # fmt: skip
        self._must_run_tokens = {rid: n for rid, n in marked.items() if rid in self._must_run}

    def rebalance(self, state: SchedulerState, est: CostEstimates) -> Decision:
        """Take a decision now (timed into `decision_log`) and put it in force."""
        t0 = time.perf_counter()
        self.decisions += 1
        if self._must_run:
            self._keep_must_run(state)
        snap = Snapshot.take(state, self.slack_s(state), self.config.max_hold_s, self._must_run)
        if snap.must_run is not None:
            for i in snap.must_run.nonzero()[0].tolist():
                rid = snap.rids[i]
                if rid not in self._must_run:
                    self._must_run[rid] = snap.reqs[i]
                    self._must_run_tokens[rid] = state.tracker[rid].num_generated
        snap.capacity_floor = self._capacity_floor(state.now)
        was_overloaded = self.decision is not None and self.decision.overloaded
        snap.overload_since = self._overload_since if was_overloaded else state.now
        self.decision = decide(snap, est, self.config, was_overloaded)
        self._overload_since = snap.overload_since if self.decision.overloaded else math.inf
        if math.isfinite(self.decision.capacity):
            self._capacities.append((state.now, self.decision.capacity))
        self.clock.decided(state.now, self.decision.give_way_at)
        self._wanted = {rid: i for i, rid in enumerate(self.decision.running)}
        self._victims = self.decision.victims
        wanted, tracker = self._wanted, state.tracker
        if self.decision.as_fcfs:  # fcfs's plan calls no one back: a wait in its queue is no call-back's delay
            self._called_back.clear()
            wanted = {}
        for req in (*state.paused, *state.waiting):  # called back: started, off the device, wanted running
            rid = req.request_id
            if rid in wanted and rid not in self._called_back and req.rate is not None and tracker[rid].num_generated:
                self._called_back[rid] = (req, state.now)
        self.decision_log.append((len(snap.reqs), time.perf_counter() - t0))
        return self.decision

    def _schedule(
        self, state: SchedulerState, est: CostEstimates, victims: list[Request], entrants: list[Request], *, fcfs: bool
    ) -> StepPlan:
        """Every running request steps; entrants follow in urgency order; newcomers too in fcfs mode. A victim
        of the decision is preempted only when an entrant (or a page shortage) needs its room this step."""
        decision = self.decision
        overloaded = decision is not None and decision.overloaded
        fill = StepFill(state, est, victims)
        plan, budget, pending, gone = fill.plan, fill.budget, fill.pending, fill.gone
        running = list(state.running)
        for req in running:
            if req.request_id in gone:
                continue
            n, pages = budget.chunk(state, req)
            if n <= 0 or budget.seqs <= 0:
                continue
            while pages > budget.pages:  # out of pages mid-decode: the decision's victims go first
                staying = [r for r in running if r.request_id not in gone]
                # Overloaded, nobody can be kept fed: a buffer too small to pay for its round trip does not yield.
                victim = pending[-1] if pending else self._short_of_pages(state, staying, overloaded)
                fill.preempt(victim)
                if victim is req:
                    break
            if req.request_id not in gone:
                fill.take(req, n, pages)
        load_budget_s = est.decode_step_s  # loads that one step of compute hides; the rest wait a step
        # W: an entrant beyond it takes a victim's slot; overloaded, only memory does (fill it, as fcfs would).
        slots = state.executor.max_num_seqs if overloaded else math.ceil(decision.working_set) if decision else 1
        entered = 0
        for req in entrants:
            load_s = 0.0
            if req.status is RequestStatus.PAUSED:
                load_s = pages_for(req.num_computed, state.executor.page_size) * est.swap_in_per_page_s
                if plan.swap_in and load_s > load_budget_s:
                    continue
            n, pages = budget.chunk(state, req)
            room = budget.pages + sum(map(state.pages_freed_by, pending))
            while (
                pending
                and pages <= room
                and (budget.seqs <= 0 or pages > budget.pages or len(state.running) - len(gone) + entered >= slots)
            ):
                fill.preempt(pending[-1])
            n, pages = budget.chunk(state, req)
            if budget.seqs <= 0 or n <= 0 or pages > budget.pages:
                continue
            if req.status is RequestStatus.PAUSED:
                load_budget_s -= load_s
                plan.swap_in.append(req.request_id)
            fill.take(req, n, pages)
            entered += 1
        if plan.swap_out and pending:  # a swap-out waits for the copy engine's backlog: pay that once per step
            for _ in range(min(len(pending), sum(r.request_id not in plan.schedule for r in entrants))):
                fill.preempt(pending[-1])
        if fcfs:
            admit_in_order(state, plan, budget, list(state.waiting))
        for rid in (*plan.swap_out, *plan.recompute_out):  # paused: no longer wanted running until a decision
            self._wanted.pop(rid, None)
        plan.sync_order = write_through_order(state, plan, self._write_through_floor(state, est, plan))
        return plan

    def _write_through_floor(
        self, state: SchedulerState, est: CostEstimates, plan: StepPlan
    ) -> dict[str, float] | None:
        """Where copies stretch the steps (they share the compute's cores: `swap_step_per_page_s` > 0), only the
        streams that could give way to a newcomer now write through: those past where they sort after one (tau1
        of buffer, or `stickiness_s`: the lower). A stream below it is paused only on a page shortage, and copies
        its pages then. Written through all along, the copies of a burst's newcomers slowed the very steps the
        policy read its capacity from (docs/DESIGN.md 4). Where copies overlap compute, every stream (None)."""
        if est.swap_step_per_page_s <= 0:
            return None
        floors: dict[str, float] = {}
        stickiness_s, scheduled = self.config.stickiness_s, plan.schedule
        for req in (*state.running, *state.paused, *state.waiting):
            if req.rate is not None and req.request_id in scheduled:
                floors[req.request_id] = min(TAU1_FRACTION * req.sampling.max_tokens, stickiness_s * req.rate)
        return floors

    def _capacity_floor(self, now: float) -> float:
        """The lowest Gamma of the decisions of the last `overload_clear_s` (inf: none, or a window of 0)."""
        window, capacities = self.config.overload_clear_s, self._capacities
        if window <= 0:
            return math.inf
        while capacities and capacities[0][0] < now - window:
            capacities.popleft()
        return min((gamma for _, gamma in capacities), default=math.inf)

    def slack_s(self, state: SchedulerState) -> float:
        """What the resume lead adds to the margin: the clients' delivery lag and how long call-backs take. While
        overloaded, call-backs wait in a queue that a longer lead only lengthens (more streams due at once), so
        the delay counts only when the machine keeps up (on a noisy host it is the host's jitter)."""
        if self.decision is not None and self.decision.overloaded:
            return state.delivery_lag_s
        return state.delivery_lag_s + self.resume_delay.value

    def _note_resumes(self, state: SchedulerState) -> None:
        """Fold the streams called back that run again (their wait) into `resume_delay`; forget those that
        finished meanwhile."""
        overloaded = self.decision is not None and self.decision.overloaded
        for rid, (req, since) in list(self._called_back.items()):
            if req.status is RequestStatus.RUNNING:
                if since < state.now and not overloaded:
                    self.resume_delay.add(state.now - since)
                del self._called_back[rid]
            elif req.status is RequestStatus.FINISHED or rid not in state.tracker:
                del self._called_back[rid]

    def _short_of_pages(self, state: SchedulerState, running: list[Request], overloaded: bool) -> Request:
        """The running request a page shortage pauses where the decision left none out: the largest buffer. While
        overloaded, only a buffer past `stickiness_s` (it sorts after every dry stream in the decision too); else the
        latest arrival, the stream the decision's fcfs order ranks last. The latest admitted, as fcfs yields, was
        on a contended CPU the stream just loaded back: dry, it was wanted straight back, a rotation every few
        steps (docs/DESIGN.md 3.13)."""
        largest = self._largest_buffer(state, running)
        if not overloaded or self._spare_s(state, largest) > self.config.stickiness_s:
            return largest
        return max(running, key=lambda r: (r.arrival, r.request_id))

    def _largest_buffer(self, state: SchedulerState, running: list[Request]) -> Request:
        """The running request a page shortage pauses: the largest buffer in seconds; a rate-less request, which
        no reader waits on, before any stream unless it must run."""
        return max(running, key=lambda r: (self._spare_s(state, r), r.admitted_order))

    def _spare_s(self, state: SchedulerState, r: Request) -> float:
        """Seconds of buffer `r`'s reader holds (a rate-less request: none if it must run, else unbounded)."""
        if r.rate is None:
            return 0.0 if r.request_id in self._must_run else math.inf
        return state.tracker[r.request_id].buffer_tokens(state.now) / r.rate


class StreamsFirstFCFS(FCFSPolicy):
    """fcfs's plan; while `rateless_wait` (rate-less requests sit steps out, `rateless_step`), its queue holds back
    the rate-less requests not yet held `max_hold_s`, so that the slots go to the streams."""

    rateless_wait = False

    def queue(self, state: SchedulerState) -> list[Request]:
        queue = super().queue(state)
        if not self.rateless_wait:
            return queue
        return [r for r in queue if r.rate is not None or held_back(state, r, self.max_hold_s)]


class StepFill:
    """One iteration's plan as it fills: the token, slot and page budget left, free host pages, the decision's
    victims not paused yet (least urgent last: popped first), those paused, and the pages each step takes.

    Pausing is instant but loads trickle in a step at a time: pausing ahead of need only shrinks the batch, so a
    victim is paused only when its room is needed."""

    def __init__(
        self, state: SchedulerState, est: CostEstimates, victims: Sequence[Request], plan: StepPlan | None = None
    ) -> None:
        self.state, self.est = state, est
        self.plan = StepPlan() if plan is None else plan
        self.budget = budget_for(state)
        self.host_free = state.executor.free_host_pages()
        self.pending = list(victims)
        self.gone: set[str] = set()
        self.taken: dict[str, int] = {}  # pages each scheduled request takes this step

    def take(self, req: Request, n: int, pages: int) -> None:
        self.budget.take(self.plan, req, n, pages)
        self.taken[req.request_id] = pages

    def preempt(self, victim: Request) -> None:
        """Pause `victim` by swap or recompute, whichever is cheaper (`costs`), undoing its step if it had one."""
        plan, budget, rid = self.plan, self.budget, victim.request_id
        if rid in plan.schedule:  # already stepped this iteration: undo that
            budget.tokens += plan.schedule.pop(rid)
            budget.seqs += 1
            budget.pages += self.taken.pop(rid)
        page_size = self.state.executor.page_size
        _, swap = preemption_costs_of([victim], self.est, page_size, self.host_free)
        if swap[0]:
            plan.swap_out.append(rid)
            self.host_free -= max(0, pages_for(victim.num_computed, page_size) - len(victim.host_pages))
        else:
            plan.recompute_out.append(rid)
        budget.pages += self.state.pages_freed_by(victim)
        self.gone.add(rid)
        if victim in self.pending:
            self.pending.remove(victim)
