"""The engine loop: ask the policy for a plan, have the executor carry it out, account tokens and buffers.

Shared by the real engine and the simulator (they differ only in the Executor).
"""

from __future__ import annotations

import dataclasses
import operator
import time
from collections.abc import Iterable
from typing import NamedTuple

from tokenflow_jax.metrics import RequestRecord
from tokenflow_jax.request import PENDING_TOKEN, Request, RequestStatus
from tokenflow_jax.scheduler.interface import Executor, Policy, SchedulerState, StepPlan
from tokenflow_jax.tracker import RequestTracker

PREEMPTION_MODES = ("auto", "swap", "recompute")
_admitted_order = operator.attrgetter("admitted_order")


class TokenEvent(NamedTuple):
    """One token for one request (a named tuple: one per token per step, ~4x faster to build than a frozen
    dataclass)."""

    request_id: str
    token_id: int
    time: float
    finished: bool
    finish_reason: str | None


@dataclasses.dataclass(frozen=True)
class CoreStats:
    """The live requests at a glance: how many in each queue, their preemptions and rebuffering so far."""

    running: int = 0
    waiting: int = 0
    paused: int = 0
    preemptions_swap: int = 0
    preemptions_recompute: int = 0
    rebuffer_s: float = 0.0


@dataclasses.dataclass
class PrefixCacheStats:
    """Prompt tokens looked up in the prefix cache when requests start (or restart after recompute), and those
    found: on the device, or on the host tier and loaded back (vLLM's prefix_cache_queries / _hits, in tokens)."""

    queries: int = 0
    hits: int = 0
    host_hits: int = 0


class EngineCore:
    """Owns the request queues. `step()` runs one iteration and returns the tokens it produced."""

    def __init__(
        self,
        executor: Executor,
        policy: Policy,
        *,
        eos_token_ids: Iterable[int] = (),
        preemption: str = "auto",
    ) -> None:
        if preemption not in PREEMPTION_MODES:
            raise ValueError(f"preemption must be one of {PREEMPTION_MODES}, got {preemption!r}")
        self.executor = executor
        executor.settle()  # a step an earlier core left in flight is not ours: its tokens would reach our ids
        self.policy = policy
        self.preemption = preemption
        self.eos_token_ids = frozenset(eos_token_ids)
        self.requests: dict[str, Request] = {}
        # Requests whose last token is sampled but not read yet: nothing left to compute, pages already freed.
        self.draining: dict[str, Request] = {}
        self.tracker = RequestTracker()
        self.delivery_lag_s = 0.0  # set by a server (`AsyncEngine`): how far behind the engine clients get tokens
        self.records: dict[str, RequestRecord] = {}
        self.scheduler_times_s: list[float] = []
        self.bytes_to_host = 0
        self.bytes_to_device = 0
        self._admissions = 0
        self.prefix_cache = PrefixCacheStats()
        self.last_step_moved = False  # the latest step computed, sampled, paused or resumed something

    # ---- queues
    def _with_status(self, status: RequestStatus) -> list[Request]:
        return [r for r in self.requests.values() if r.status is status]

    @staticmethod
    def _by_arrival(waiting: list[Request]) -> list[Request]:
        return sorted(waiting, key=lambda r: (r.arrival, r.request_id))

    @staticmethod
    def _by_admission(running: list[Request]) -> list[Request]:
        return sorted(running, key=_admitted_order)

    @property
    def waiting(self) -> list[Request]:
        return self._by_arrival(self._with_status(RequestStatus.WAITING))

    @property
    def running(self) -> list[Request]:
        return self._by_admission(self._with_status(RequestStatus.RUNNING))

    @property
    def paused(self) -> list[Request]:
        return self._with_status(RequestStatus.PAUSED)

    def _queues(self) -> tuple[list[Request], list[Request], list[Request]]:
        """(waiting, running, paused) as the properties give them, from one pass over the requests (every step)."""
        queues: dict[RequestStatus, list[Request]] = {status: [] for status in RequestStatus}
        for req in self.requests.values():
            queues[req.status].append(req)
        return (self._by_arrival(queues[RequestStatus.WAITING]), self._by_admission(queues[RequestStatus.RUNNING]),
                queues[RequestStatus.PAUSED])  # fmt: skip

    def has_work(self) -> bool:
        return bool(self.requests or self.draining)

    def live_ids(self) -> list[str]:
        """Requests not finished yet, including those whose last token is still on its way to the host."""
        return [*self.requests, *self.draining]

    def is_live(self, request_id: str) -> bool:
        return request_id in self.requests or request_id in self.draining

    # ---- requests
    def add_request(self, req: Request) -> None:
        if self.is_live(req.request_id) or req.request_id in self.records:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        if not req.prompt_ids:
            raise ValueError("prompt must contain at least one token")
        limit = self.executor.max_model_len
        if len(req.prompt_ids) + req.sampling.max_tokens > limit:
            raise ValueError(
                f"prompt ({len(req.prompt_ids)} tokens) + max_tokens ({req.sampling.max_tokens}) "
                f"exceeds the model length {limit}"
            )
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        self.tracker.add(
            req.request_id, req.rate, req.arrival, prompt_len=len(req.prompt_ids), max_tokens=req.sampling.max_tokens
        )

    def finish(self, request_id: str, reason: str) -> None:
        """End a request (stop string, abort, length or EOS) and free its pages on both tiers."""
        req = self.requests.pop(request_id, None) or self.draining.pop(request_id, None)
        if req is None:
            return
        self.executor.release(req)
        req.output_ids = [t for t in req.output_ids if t != PENDING_TOKEN]  # a token never read is not output
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        buf = self.tracker.get(request_id)
        self.records[request_id] = RequestRecord(
            request_id=request_id,
            arrival=req.arrival,
            rate=req.rate,
            prompt_len=len(req.prompt_ids),
            token_times=list(buf.token_times),
            preemptions_swap=req.preemptions_swap,
            preemptions_recompute=req.preemptions_recompute,
        )
        self.tracker.remove(request_id)
        if not self.has_work():  # no later step will read the one in flight: wait for it now, not after idling
            self.executor.settle()

    def abort(self, request_id: str) -> None:
        self.finish(request_id, "abort")

    def forget(self, request_id: str) -> None:
        """Drop a request without releasing its pages (only after `finish` itself failed)."""
        self.requests.pop(request_id, None)
        self.draining.pop(request_id, None)

    def pop_record(self, request_id: str) -> RequestRecord | None:
        """Hand over a finished request's record (a server keeps none: it runs for days)."""
        return self.records.pop(request_id, None)

    def stats(self) -> CoreStats:
        counts = {"running": 0, "waiting": 0, "paused": 0}
        swap = recompute = 0
        for req in self.requests.values():
            status = req.status.value
            if status in counts:
                counts[status] += 1
            swap += req.preemptions_swap
            recompute += req.preemptions_recompute
        rebuffer = sum(buffer.rebuffer_s for _, buffer in self.tracker.items())
        return CoreStats(**counts, preemptions_swap=swap, preemptions_recompute=recompute, rebuffer_s=rebuffer)

    def trim_scheduler_times(self, keep: int) -> None:
        del self.scheduler_times_s[:-keep]

    # ---- one iteration
    def _apply_preemption_mode(self, plan: StepPlan) -> None:
        if self.preemption == "recompute":
            plan.recompute_out += plan.swap_out
            plan.swap_out = []
        elif self.preemption == "swap" and self.executor.num_host_pages:
            plan.swap_out += plan.recompute_out
            plan.recompute_out = []

    def _validate(self, plan: StepPlan) -> None:
        expect = {
            "swap_out": (RequestStatus.RUNNING,),
            "recompute_out": (RequestStatus.RUNNING, RequestStatus.PAUSED),
            "swap_in": (RequestStatus.PAUSED,),
        }
        for field, allowed in expect.items():
            ids = getattr(plan, field)
            if len(set(ids)) != len(ids):
                raise RuntimeError(f"policy {self.policy.name}: duplicate ids in {field}: {ids}")
            for rid in ids:
                req = self.requests.get(rid)
                if req is None or req.status not in allowed:
                    raise RuntimeError(f"policy {self.policy.name}: {field} of {rid} in state "
                                       f"{None if req is None else req.status}")  # fmt: skip
        gone = set(plan.swap_out) | set(plan.recompute_out)
        if len(plan.schedule) > self.executor.max_num_seqs:
            raise RuntimeError(f"policy {self.policy.name}: {len(plan.schedule)} sequences > max_num_seqs")
        for rid in plan.schedule:
            req = self.requests.get(rid)
            if req is None or rid in gone or (req.status is RequestStatus.PAUSED and rid not in plan.swap_in):
                raise RuntimeError(f"policy {self.policy.name}: cannot schedule {rid}")

    def _count_hits(self, plan: StepPlan, attached: dict[str, int]) -> None:
        """Fold the waiting requests this step starts into the cache counters; the rest let go of their prefix."""
        for rid in plan.schedule:
            req = self.requests[rid]
            if req.status is not RequestStatus.WAITING:
                continue
            self.prefix_cache.queries += req.num_tokens
            self.prefix_cache.hits += req.num_computed
            self.prefix_cache.host_hits += attached.get(rid, 0) * self.executor.page_size
            if req.num_cached_tokens < 0:  # the first start is what the client's usage reports
                req.num_cached_tokens = min(req.num_computed, len(req.prompt_ids))

    def step(self) -> list[TokenEvent]:
        now = self.executor.now()
        waiting, running, paused = self._queues()
        attached = self.executor.attach_cached(waiting)
        state = SchedulerState(now, waiting, running, paused, self.tracker, self.executor, self.delivery_lag_s)
        t0 = time.perf_counter()
        plan = self.policy.plan(state)
        self.scheduler_times_s.append(time.perf_counter() - t0)
        self._apply_preemption_mode(plan)
        self._validate(plan)
        if attached:
            self.executor.keep_attached([self.requests[rid] for rid in attached], plan.schedule)
        self._count_hits(plan, attached)
        swapped_out = set(plan.swap_out)
        result = self.executor.execute(plan, self.requests)
        self.bytes_to_host += result.bytes_to_host
        self.bytes_to_device += result.bytes_to_device
        for rid in plan.recompute_out:
            req = self.requests[rid]
            req.status = RequestStatus.WAITING
            req.preemptions_recompute += 1
        dropped = set(result.swap_fallbacks)
        for rid in plan.swap_out:
            req = self.requests[rid]
            if rid in dropped:  # the host tier had no room for its copy: the executor dropped it for recompute
                req.status = RequestStatus.WAITING
                req.preemptions_recompute += 1
            else:
                req.status = RequestStatus.PAUSED
                req.preemptions_swap += 1
        for rid in list(plan.swap_in) + list(plan.schedule):
            req = self.requests[rid]
            if req.status is not RequestStatus.RUNNING and rid not in swapped_out:
                req.status = RequestStatus.RUNNING
                self._admissions += 1
                req.admitted_order = self._admissions
        now = self.executor.now()
        events = []
        for rid, token in result.sampled.items():
            req = self.requests.get(rid) or self.draining.get(rid)
            if req is None:
                continue  # finished or aborted while its token was in flight
            # A pending token is always the last one (one step in flight at most): O(1), not a scan of the output.
            if req.output_ids and req.output_ids[-1] == PENDING_TOKEN:
                req.output_ids[-1] = token
            else:
                req.output_ids.append(token)
            self.tracker.on_token(rid, now)
            reason = None
            if token in self.eos_token_ids and not req.sampling.ignore_eos:
                reason = "stop"
            elif len(req.output_ids) >= req.sampling.max_tokens:  # (no pending token left: it was the last)
                reason = "length"
            events.append(TokenEvent(rid, token, now, reason is not None, reason))
            if reason is not None:
                self.finish(rid, reason)
        for rid in result.pending:
            req = self.requests.get(rid)
            if req is None:
                continue  # its previous token ended it
            req.output_ids.append(PENDING_TOKEN)
            if len(req.output_ids) >= req.sampling.max_tokens:
                # Its last token is sampled: nothing more to compute, so the pages go now.
                self.executor.release(req)
                self.draining[rid] = self.requests.pop(rid)
        self.last_step_moved = bool(events or plan.schedule or plan.swap_out or plan.recompute_out or plan.swap_in)
        return events
