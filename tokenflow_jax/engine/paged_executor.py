"""`PagedExecutor`: carries out StepPlans over the two-tier page bookkeeping and keeps the live cost estimates.

Plain host Python: the real executor (`engine.executor`) and the simulator (`sim.executor`) subclass it and move
the data (or charge its modelled time).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Container, Sequence
from typing import Any

from tokenflow_jax.batching import SequenceChunk
from tokenflow_jax.engine.step_model import DecodeStepModel
from tokenflow_jax.estimators import DecayingPeak, MovingAverage, PerPageCost
from tokenflow_jax.kv.block_manager import KVBlockManager, PageCopy
from tokenflow_jax.request import Request
from tokenflow_jax.scheduler.interface import CostEstimates, StepPlan, StepResult

SamplingRow = tuple[float, int, float, int, int]  # temperature, top_k, top_p, seed, step


@dataclasses.dataclass(frozen=True)
class InFlightStep:
    """A dispatched step whose sampled tokens the host has not read yet."""

    handle: Any
    request_ids: list[str]  # one row each, in batch order
    completing: list[bool]  # whether the row samples a token (False: a prefill chunk mid-prompt)
    decode: bool
    num_tokens: int
    dispatched_at: float
    context_tokens: int = 0  # tokens the step's sequences hold after it


class PagedExecutor:
    """Carries out StepPlans over the two-tier page bookkeeping. Subclasses move the data (or model its cost):
    `_compute`, `_copy_to_host`, `_load_to_device`, `_flush_to_host` (or `_await_host_copy`), `now`, `idle_until`.

    KV fields of `Request` (pages, num_computed, host sync) are updated here; statuses are the caller's.
    """

    def __init__(
        self,
        *,
        num_device_pages: int,
        num_host_pages: int,
        page_size: int,
        max_num_seqs: int,
        max_batch_tokens: int,
        max_model_len: int,
        write_through: bool = True,
        max_transfer_pages: int = 1 << 30,
        prefix_caching: bool = False,
        cache_salt: str = "",
    ) -> None:
        self.page_size = page_size
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.max_model_len = max_model_len
        self.write_through_enabled = write_through and num_host_pages > 0
        self.blocks = KVBlockManager(num_device_pages, num_host_pages, page_size, prefix_caching=prefix_caching,
                                     cache_salt=cache_salt)  # fmt: skip
        self.num_device_pages = self.blocks.device.capacity
        self.num_host_pages = self.blocks.host.capacity if self.blocks.host else 0
        self.max_transfer_pages = max_transfer_pages
        self.bytes_to_host = 0
        self.bytes_to_device = 0
        self._decode_step = MovingAverage(0.01, 0.2, 0.05)  # as `DecodeStepModel.speed`
        self._prefill_per_token = MovingAverage(0.001)
        self._d2h_per_page = MovingAverage(1e-5)
        self._h2d_per_page = MovingAverage(1e-5)
        self.decode_model = DecodeStepModel()
        self._step_peak = DecayingPeak()  # of every step's duration, prefill chunks included
        # Seconds a page a swap moves adds to the decode step it falls in: ~0 where copies overlap compute (a GPU's
        # copy engines), not where they share its cores (the CPU backend; docs/DESIGN.md 3.15). A slope over the
        # recent steps, so that a slowdown every step shares is not read as the swaps' cost.
        self._swap_stretch = PerPageCost()
        self._swapped_pages = 0  # pages swaps moved since the last step was read
        self._in_flight: InFlightStep | None = None
        self._last_resolved_at = -float("inf")
        self._host_ticket: dict[int, Any] = {}  # host page -> ticket of the latest copy into it
        # While a plan is made: waiting requests attached to idle cached (or loaded) pages, and those pages. They
        # count as free until a request that holds them starts, which is charged for them (`pinned_pages_of`).
        self._pinned_of: dict[str, int] = {}
        self._pinned: set[int] = set()

    # Read sampled tokens one step late: the next step is dispatched before the host waits for this one's.
    pipelined = False

    # ---- data movement and time: the subclass's part
    def now(self) -> float:
        raise NotImplementedError

    def idle_until(self, t: float) -> None:
        raise NotImplementedError

    def _compute(self, chunks: list[SequenceChunk], rows: list[SamplingRow], request_ids: list[str]) -> Any:
        """Dispatch one model step; return a handle `_sampled_tokens` turns into host token ids. A chunk's last
        token may be PENDING_TOKEN: sampled by the in-flight step for the same request, not read yet."""
        raise NotImplementedError

    def _sampled_tokens(self, handle: Any) -> list[int]:
        raise NotImplementedError

    def _copy_to_host(self, copy: PageCopy) -> Any:
        """Start copying device pages to host pages; return a ticket for `_await_host_copy` (None: no waiting)."""
        raise NotImplementedError

    def _flush_to_host(self) -> None:
        raise NotImplementedError

    def _await_host_copy(self, ticket: Any) -> None:
        """Wait until the copy `ticket` names has landed (by default: every queued copy)."""
        self._flush_to_host()

    def _load_to_device(self, copy: PageCopy) -> None:
        raise NotImplementedError

    def _pending_to_host_pages(self) -> int:
        return 0

    # ---- Executor protocol
    def free_device_pages(self) -> int:
        return self.blocks.device.num_free + len(self._pinned)

    def free_host_pages(self) -> int:
        return self.blocks.host.num_free if self.blocks.host else 0

    def page_usage(self) -> tuple[int, int, int, int]:
        """(device used, device usable, host used, host usable) pages."""
        device, host = self.blocks.device, self.blocks.host
        return device.num_used, device.capacity, (host.num_used if host else 0), (host.capacity if host else 0)

    # The measured costs `estimates` reads. A bench that replays several policies on one executor gives each policy
    # its own (`estimator_state`, `restore_estimators`), as a server running that policy alone would have them.
    ESTIMATORS = ("_decode_step", "_prefill_per_token", "_d2h_per_page", "_h2d_per_page", "decode_model",
                  "_step_peak", "_swap_stretch")  # fmt: skip

    def estimator_state(self) -> dict[str, Any]:
        """A copy of the measured costs, for `restore_estimators`."""
        return {name: copy.deepcopy(getattr(self, name)) for name in self.ESTIMATORS}

    def restore_estimators(self, state: dict[str, Any]) -> None:
        for name in self.ESTIMATORS:
            setattr(self, name, copy.deepcopy(state[name]))

    def estimates(self) -> CostEstimates:
        step = self._decode_step.value
        return CostEstimates(
            decode_step_s=step,
            prefill_per_token_s=self._prefill_per_token.value,
            swap_out_per_page_s=self._d2h_per_page.value,
            swap_in_per_page_s=self._h2d_per_page.value,
            pending_transfer_s=self._pending_transfer_s(),
            decode_capacity_tok_s=self.max_num_seqs / max(step, 1e-6),
            decode_step_model=self.decode_model.coefficients,
            step_peak_s=self._step_peak.value,
            swap_step_per_page_s=self._swap_stretch.value,
        )

    def _pending_transfer_s(self) -> float:
        return self._pending_to_host_pages() * self._d2h_per_page.value

    def execute(self, plan: StepPlan, requests: dict[str, Request]) -> StepResult:
        """Apply the plan and dispatch its step. Pipelined executors return the previous step's tokens (read
        while this one computes) and list this step's sampling requests as `pending`; others return this step's.
        """
        t0 = self.now()
        to_host0, to_device0 = self.bytes_to_host, self.bytes_to_device
        for rid in plan.recompute_out:
            self.drop(requests[rid])
        fallbacks = [rid for rid in plan.swap_out if not self.swap_out(requests[rid])]
        for rid in plan.swap_in:
            self.swap_in(requests[rid])
        previous = self._in_flight  # still visible to `_compute`: it feeds this step's pending tokens
        current = self._dispatch(plan, requests) if plan.schedule else None
        self._in_flight = None
        sampled = self._resolve(previous) if previous else {}
        pending: list[str] = []
        if current is not None:
            if self.pipelined:
                self._in_flight = current
                pending = [rid for rid, completes in zip(current.request_ids, current.completing, strict=True)
                           if completes]  # fmt: skip
            else:
                sampled.update(self._resolve(current))
        num_tokens = sum(plan.schedule.values())
        return StepResult(sampled, self.now() - t0, num_tokens, self.bytes_to_host - to_host0,
                          self.bytes_to_device - to_device0, pending, fallbacks)  # fmt: skip

    def settle(self) -> None:
        """Wait for the step in flight, if any, and drop its tokens: their requests are gone (the last one just
        ended, or this executor is passing to a new core). Timed now, not after the idle gap that may follow."""
        if self._in_flight is not None:
            step, self._in_flight = self._in_flight, None
            self._resolve(step)

    def _resolve(self, step: InFlightStep) -> dict[str, int]:
        """Read a dispatched step's sampled tokens (waits for it) and fold its duration into the estimates."""
        tokens = self._sampled_tokens(step.handle)
        end = self.now()
        # Back to back, a step's duration is the gap between reads; after an idle gap, from its dispatch.
        elapsed = end - max(step.dispatched_at, self._last_resolved_at)
        self._last_resolved_at = end
        self._step_peak.add(elapsed)
        swapped, self._swapped_pages = self._swapped_pages, 0
        if step.decode:
            # What a step took beyond its compute as predicted now, against the pages its swaps moved.
            compute_s = self.decode_model.predict_now(step.num_tokens, step.context_tokens)
            if compute_s is not None:
                self._swap_stretch.add(swapped, elapsed - compute_s)
            self._decode_step.update(elapsed)
            self.decode_model.add(step.num_tokens, step.context_tokens, elapsed)
        else:
            self._prefill_per_token.update(elapsed / step.num_tokens)
        return {rid: tokens[i] for i, rid in enumerate(step.request_ids) if step.completing[i]}

    def release(self, req: Request) -> None:
        # Queued write-through copies into freed host pages are FIFO-ordered before any later owner's copies.
        self.drop(req)
        self.blocks.forget(req)

    def pages_freed_by(self, req: Request) -> int:
        return self.blocks.pages_freed_by(req)

    def shared_pages_overcount(self, requests: Sequence[Request]) -> list[float] | None:
        return self.blocks.overcount(requests)

    # ---- prefix cache
    @property
    def prefix_caching(self) -> bool:
        return self.blocks.prefix_caching

    def reset_prefix_cache(self, enabled: bool | None = None) -> None:
        """Empty the prefix cache; `enabled` turns it on or off too."""
        self.blocks.reset_prefix_cache(self.prefix_caching if enabled is None else enabled)

    def attach_cached(self, waiting: Sequence[Request]) -> dict[str, int]:
        """Map waiting requests (the first `max_num_seqs`, in the order a policy would admit them) onto their
        cached prefixes before it plans, so that it sees only the tokens left to compute. Host-only pages are
        loaded when that is cheaper than recomputing them (the live estimates, as preemption weighs). Idle pages
        an attached request holds still count as free while the plan is made (`keep_attached` settles them).
        Returns request id -> pages loaded from the host tier (0: device hits only)."""
        attached: dict[str, int] = {}
        if not (waiting and self.prefix_caching):
            return attached
        est = self.estimates()
        device = self.blocks.device
        for req in waiting[: self.max_num_seqs]:
            if req.device_pages or req.num_computed:
                continue
            prefix = self.blocks.cached_prefix(req)
            host_only = prefix.host_only
            if host_only and est.swap_in_per_page_s > self.page_size * est.prefill_per_token_s:
                host_only = 0  # recomputing a page costs less than loading it
            if not prefix.device_pages and not host_only:
                continue
            revived = [p for p in prefix.device_pages if device.is_idle(p)]
            copy = self.blocks.attach(req, prefix, host_only)
            if copy is None:
                break
            if copy.src:
                self._load(copy)
            self._pinned.update(revived, copy.dst)
            self._pinned_of[req.request_id] = len(revived) + len(copy.dst)
            attached[req.request_id] = host_only
        return attached

    def pinned_pages_of(self, req: Request) -> int:
        """Pages counted as free that `req` holds only because it was attached: starting it takes them."""
        return self._pinned_of.get(req.request_id, 0) if self._pinned_of else 0

    def keep_attached(self, requests: Sequence[Request], started: Container[str]) -> None:
        """The plan is made: attached requests it starts keep their prefix, the others let go of it (it stays
        cached)."""
        for req in requests:
            if req.request_id not in started:
                self.drop(req)
        self._pinned_of.clear()
        self._pinned.clear()

    # ---- KV movement
    def drop(self, req: Request) -> None:
        """Preempt by recompute: forget the request's KV on both tiers."""
        self.blocks.release(req)
        req.num_computed = 0

    def swap_out(self, req: Request) -> bool:
        """Preempt by swap: complete the host copy, then free device pages at once. False: the host tier is
        full, so the request was dropped for recompute instead."""
        copy = self.blocks.evict_tail(req) if self.num_host_pages else None
        if copy is None:
            self.drop(req)
            return False
        self._swapped_pages += len(copy.src)
        self._transfer_to_host(copy)
        self.blocks.free_device(req)
        return True

    def swap_in(self, req: Request) -> None:
        copy = self.blocks.swap_in(req)
        self._swapped_pages += len(copy.src)
        self._load(copy)

    def _load(self, copy: PageCopy) -> None:
        """Load host pages to the device once their copies have landed."""
        # Wait for the latest copy into these pages, not for the copies the running requests queued since
        # (FIFO: that one landing means every earlier one has).
        tickets = [t for p in copy.src if (t := self._host_ticket.get(p)) is not None]
        self._await_host_copy(max(tickets) if tickets else None)
        t0 = self.now()
        self._transfer_to_device(copy)
        if copy.src:
            self._h2d_per_page.update((self.now() - t0) / len(copy.src))

    def _transfer_to_host(self, copy: PageCopy) -> None:
        """Copy in chunks of at most `max_transfer_pages`; each host page remembers the ticket of its copy."""
        for start in range(0, len(copy.src), self.max_transfer_pages):
            end = start + self.max_transfer_pages
            ticket = self._copy_to_host(PageCopy(copy.request_id, copy.src[start:end], copy.dst[start:end]))
            if ticket is not None:
                self._host_ticket.update(dict.fromkeys(copy.dst[start:end], ticket))

    def _transfer_to_device(self, copy: PageCopy) -> None:
        for start in range(0, len(copy.src), self.max_transfer_pages):
            end = start + self.max_transfer_pages
            self._load_to_device(PageCopy(copy.request_id, copy.src[start:end], copy.dst[start:end]))

    def _write_through(self, order: list[Request]) -> None:
        """Sync completed pages to the host, budgeted to what one step's time can hide."""
        per_page = max(self._d2h_per_page.value, 1e-7)
        budget = int(min(self.max_transfer_pages, max(1, self._decode_step.value / per_page)))
        copies = self.blocks.write_through(order, budget)
        src = [p for c in copies for p in c.src]
        if src:
            self._transfer_to_host(PageCopy("write-through", src, [p for c in copies for p in c.dst]))

    def _dispatch(self, plan: StepPlan, requests: dict[str, Request]) -> InFlightStep:
        chunks, rows, completing = [], [], []
        for rid, n in plan.schedule.items():
            req = requests[rid]
            start, total = req.num_computed, req.num_tokens
            if n < 1 or start + n > total:
                raise ValueError(f"{rid}: cannot compute {n} tokens ({start}/{total} done)")
            self.blocks.grow_device(req, start + n)
            chunks.append(SequenceChunk(req.token_slice(start, start + n), start, req.device_pages))
            s = req.sampling
            rows.append((s.temperature, s.top_k, s.top_p, req.seed, len(req.output_ids)))
            completing.append(start + n == total)
        dispatched_at = self.now()
        handle = self._compute(chunks, rows, list(plan.schedule))
        for rid, n in plan.schedule.items():
            req = requests[rid]
            first_full = req.num_computed // self.page_size
            req.num_computed += n
            if self.prefix_caching and req.num_computed // self.page_size > first_full:
                self.blocks.index_device(req, first_full)
        if self.write_through_enabled:
            order = [requests[rid] for rid in (plan.schedule if plan.sync_order is None else plan.sync_order)]
            self._write_through([r for r in order if r.device_pages])
        num_tokens = sum(plan.schedule.values())
        context = sum(c.start + len(c.token_ids) for c in chunks)
        return InFlightStep(handle, list(plan.schedule), completing, num_tokens == len(chunks), num_tokens,
                            dispatched_at, context)  # fmt: skip
