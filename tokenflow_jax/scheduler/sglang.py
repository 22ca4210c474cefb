"""`sglang`: the SGLang-like baseline (prefill-first, retract-by-recompute).

SGLang runs prefill batches separately from decode batches and prefers prefill: whenever a waiting request
can be admitted, the iteration is a prefill-only step (continuing chunked prefills first, then new requests
in arrival order); otherwise it is a decode step over every running request. Admission reserves memory for
the running requests' future tokens (`max_tokens` left x `new_token_ratio`, SGLang's estimate, which decays
while decoding goes well). When a decode step runs out of pages, the running request with the fewest output
tokens (longest prompt on ties) is retracted by recompute and the ratio is raised so admission backs off.
Rate-less requests are treated as any other (`max_hold_s` has nothing to bound, as under fcfs).

`sglang-chunked` (`chunked_prefill_size`) is SGLang with chunked prefill and mixed batches
(`--chunked-prefill-size N --enable-mixed-chunk`): every step decodes every running request and carries at
most N prompt tokens (continuing a chunked prefill first, then new requests in arrival order), so long prompts
no longer stop the decoders.
"""

from __future__ import annotations

import dataclasses

from tokenflow_jax.request import Request
from tokenflow_jax.scheduler.budget import admission_queue, budget_for, write_through_order
from tokenflow_jax.scheduler.interface import SchedulerState, StepPlan
from tokenflow_jax.scheduler.rateless import DEFAULT_MAX_HOLD_S, check_max_hold

RETRACT_DECODE_STEPS = 20  # SGLang: tokens of headroom per retracted-from batch member when re-estimating


@dataclasses.dataclass
class SGLangPolicy:
    init_new_token_ratio: float = 0.7
    min_new_token_ratio: float = 0.1
    new_token_ratio_decay: float = 0.001  # per decode step
    max_hold_s: float = DEFAULT_MAX_HOLD_S  # accepted by every policy; prefill-first holds nobody back for a stream
    chunked_prefill_size: int | None = None  # prompt tokens per mixed step; None: prefill-only steps
    name: str = dataclasses.field(default="sglang", init=False)
    uses_write_through: bool = dataclasses.field(default=False, init=False)

    def __post_init__(self) -> None:
        if not 0 <= self.min_new_token_ratio <= self.init_new_token_ratio <= 1:
            raise ValueError("need 0 <= min_new_token_ratio <= init_new_token_ratio <= 1")
        check_max_hold(self.max_hold_s)
        if self.chunked_prefill_size is not None and self.chunked_prefill_size < 1:
            raise ValueError(f"chunked_prefill_size must be >= 1 or None, got {self.chunked_prefill_size!r}")
        self.new_token_ratio = self.init_new_token_ratio

    def plan(self, state: SchedulerState) -> StepPlan:
        if self.chunked_prefill_size is None:
            plan = self._prefill_step(state) or self._decode_step(state)
        else:
            plan = self._mixed_step(state)
        plan.sync_order = write_through_order(state, plan)
        return plan

    def _mixed_step(self, state: SchedulerState) -> StepPlan:
        """The decode batch, plus up to `chunked_prefill_size` prompt tokens in what it leaves."""
        plan = self._decode_step(state)
        gone = set(plan.recompute_out)
        budget = budget_for(state)
        budget.tokens = min(budget.tokens - len(plan.schedule), self.chunked_prefill_size or 0)
        budget.seqs -= len(plan.schedule)
        running = [r for r in state.running if r.request_id not in gone]
        budget.pages -= sum(state.extra_pages_for(r, 1) for r in running if r.request_id in plan.schedule)
        room = budget.pages * state.executor.page_size - sum(self._reserved_tokens(r) for r in running)
        for req in running:
            if req.is_prefilling and req.request_id not in plan.schedule and budget.tokens > 0 and budget.seqs > 0:
                n, pages = budget.chunk(state, req)
                if n > 0 and pages <= budget.pages:
                    budget.take(plan, req, n, pages)
                    room -= pages * state.executor.page_size
        for req in admission_queue(state):
            if budget.seqs <= 0 or budget.tokens <= 0 or req.request_id in gone:
                break
            n, pages = budget.chunk(state, req)
            cost = req.num_uncomputed + self._reserved_tokens(req)
            if n <= 0 or pages > budget.pages or (cost > room and (running or plan.schedule)):
                break  # first come first served
            budget.take(plan, req, n, pages)
            room -= cost
        return plan

    # ---- prefill batch
    def _reserved_tokens(self, req: Request) -> float:
        return req.remaining_output * self.new_token_ratio

    def _prefill_step(self, state: SchedulerState) -> StepPlan | None:
        """A prefill-only plan, or None when nothing is left to prefill or no waiting request fits."""
        plan = StepPlan()
        budget = budget_for(state)
        running = list(state.running)
        chunked = [r for r in running if r.is_prefilling]
        budget.seqs = state.executor.max_num_seqs - (len(running) - len(chunked))  # decoders keep their slots
        # Tokens of memory left after every running request's expected growth (SGLang's rem_total_tokens).
        page_size = state.executor.page_size
        room = budget.pages * page_size - sum(self._reserved_tokens(r) for r in running)
        for req in chunked:
            n, pages = budget.chunk(state, req)
            if n > 0 and pages <= budget.pages and budget.seqs > 0:
                budget.take(plan, req, n, pages)
                room -= pages * page_size
        for req in admission_queue(state):
            if budget.seqs <= 0 or budget.tokens <= 0:
                break
            n, pages = budget.chunk(state, req)
            cost = req.num_uncomputed + self._reserved_tokens(req)
            if n <= 0 or pages > budget.pages or (cost > room and (running or plan.schedule)):
                break  # first come first served: nobody overtakes the head of the queue
            budget.take(plan, req, n, pages)
            room -= cost
        return plan if plan.schedule else None

    # ---- decode batch
    def _decode_step(self, state: SchedulerState) -> StepPlan:
        plan = StepPlan()
        decoding = [r for r in state.running if not r.is_prefilling]
        free = state.executor.free_device_pages()
        need = {r.request_id: state.extra_pages_for(r, 1) for r in decoding}
        if sum(need.values()) > free:
            # Retract until the rest fit: fewest output tokens first (a stalled chunked prefill has none), then
            # the longest prompt.
            order = sorted(state.running, key=lambda r: (len(r.output_ids), -len(r.prompt_ids)))
            while sum(need.values()) > free and len(order) > 1:
                victim = order.pop(0)
                plan.recompute_out.append(victim.request_id)
                free += state.pages_freed_by(victim)
                need.pop(victim.request_id, None)
            self._raise_ratio(order)
            decoding = [r for r in decoding if r.request_id in need]
        else:
            self.new_token_ratio = max(self.min_new_token_ratio, self.new_token_ratio - self.new_token_ratio_decay)
        for req in decoding[: state.executor.max_num_seqs]:
            plan.schedule[req.request_id] = 1
        return plan

    def _raise_ratio(self, kept: list[Request]) -> None:
        """SGLang's re-estimate after a retraction: what the kept requests decoded so far, plus headroom."""
        decoded = sum(len(r.output_ids) for r in kept)
        max_new = sum(r.sampling.max_tokens for r in kept)
        estimate = (decoded + RETRACT_DECODE_STEPS * len(kept)) / max(max_new, 1)
        self.new_token_ratio = min(1.0, max(self.new_token_ratio, estimate))


CHUNKED_PREFILL_SIZE = 2048  # prompt tokens per mixed step, on every executor (SGLang sizes its default by GPU memory)


@dataclasses.dataclass
class SGLangChunkedPolicy(SGLangPolicy):
    """`sglang-chunked`: SGLang with chunked prefill mixed into the decode batches."""

    chunked_prefill_size: int | None = CHUNKED_PREFILL_SIZE
    name: str = dataclasses.field(default="sglang-chunked", init=False)
