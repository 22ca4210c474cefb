"""The contract between policy and mechanism.

Each iteration a `Policy` looks at the requests and the executor's capacity and returns a `StepPlan`;
an `Executor` (the real JAX engine or the cost-model simulator) carries it out and returns a `StepResult`.
Policies never touch arrays; executors never decide who runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Container, Sequence
from typing import Protocol

from tokenflow_jax.kv.pages import pages_for
from tokenflow_jax.request import Request, RequestStatus
from tokenflow_jax.tracker import RequestTracker


@dataclasses.dataclass
class StepPlan:
    """What one iteration does, in the order the executor applies it.

    1. `recompute_out`: drop device and host KV; the request returns to WAITING and recomputes later.
    2. `swap_out`: make the host copy complete (evict the unsynced tail), then free device pages; -> PAUSED.
    3. `swap_in`: load host pages back to the device; -> RUNNING.
    4. `schedule`: request id -> number of new tokens to compute (1 = decode, more = a prefill chunk).
    """

    schedule: dict[str, int] = dataclasses.field(default_factory=dict)
    swap_out: list[str] = dataclasses.field(default_factory=list)
    recompute_out: list[str] = dataclasses.field(default_factory=list)
    swap_in: list[str] = dataclasses.field(default_factory=list)
    # The requests whose new KV the executor copies to the host (write-through), in that order; the policy decides
    # it (`budget.write_through_order`: largest unread buffer first, the likeliest to be paused). None: every
    # scheduled request, in schedule order.
    sync_order: list[str] | None = None

    @property
    def is_empty(self) -> bool:
        return not (self.schedule or self.swap_out or self.recompute_out or self.swap_in)


@dataclasses.dataclass
class StepResult:
    """Tokens the host read this iteration (request id -> token id) and what the step cost.

    A pipelined executor reads a step's tokens during the next iteration: `pending` lists the requests whose
    token this iteration sampled but has not read yet (each gets a placeholder until it is read).
    """

    sampled: dict[str, int]
    step_time_s: float
    num_batch_tokens: int = 0
    bytes_to_host: int = 0
    bytes_to_device: int = 0
    pending: list[str] = dataclasses.field(default_factory=list)
    # Planned swap-outs the host tier had no room for: their KV was dropped, they recompute instead.
    swap_fallbacks: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class CostEstimates:
    """Live cost figures a policy weighs (seconds); executors keep them current from measurements."""

    decode_step_s: float  # one decode iteration at the current batch
    prefill_per_token_s: float
    swap_out_per_page_s: float
    swap_in_per_page_s: float
    pending_transfer_s: float  # queued write-through / swap work ahead of a new transfer
    decode_capacity_tok_s: float  # Gamma: tokens/s the engine can sustain across the batch
    # Decode step model fitted to measured steps: seconds = base + per_seq * seqs + per_context_token * context.
    # None until enough steps are measured; then `decode_step_at` falls back to the last step's time.
    decode_step_model: tuple[float, float, float] | None = None
    # A recent peak of step durations (prefill chunks, stalls of the host included): how long a resumed stream
    # may wait for its next token when steps swing.
    step_peak_s: float = 0.0
    # Seconds each page a swap moves adds to the step it shares: ~0 where copies overlap compute (a GPU's copy
    # engines); on the CPU backend the copies take the cores the step needs.
    swap_step_per_page_s: float = 0.0

    def decode_step_at(self, num_seqs: int, context_tokens: int) -> float:
        """Predicted decode step time for `num_seqs` sequences holding `context_tokens` tokens in all."""
        if self.decode_step_model is None:
            return self.decode_step_s
        base, per_seq, per_context = self.decode_step_model
        return base + per_seq * num_seqs + per_context * context_tokens


class Executor(Protocol):
    page_size: int
    num_device_pages: int  # usable (excludes the null page)
    num_host_pages: int
    max_num_seqs: int
    max_batch_tokens: int
    max_model_len: int

    def now(self) -> float: ...

    def free_device_pages(self) -> int: ...

    def free_host_pages(self) -> int: ...

    def estimates(self) -> CostEstimates: ...

    def execute(self, plan: StepPlan, requests: dict[str, Request]) -> StepResult: ...

    def settle(self) -> None: ...  # wait for a step in flight whose requests are all gone; drop its tokens

    def release(self, request: Request) -> None: ...

    def pages_freed_by(self, request: Request) -> int: ...  # device pages it frees (shared ones stay)

    # Per request: its pages shared with others less its share of them (None: nothing shared), so that a sum of
    # every request's pages counts a shared page once.
    def shared_pages_overcount(self, requests: Sequence[Request]) -> list[float] | None: ...

    # Prefix cache: map waiting requests onto cached KV before a plan, charge a request the idle pages it holds
    # only for that when it starts, and once planned, those not started let go.
    def attach_cached(self, waiting: Sequence[Request]) -> dict[str, int]: ...

    def pinned_pages_of(self, request: Request) -> int: ...

    def keep_attached(self, requests: Sequence[Request], started: Container[str]) -> None: ...

    def idle_until(self, t: float) -> None: ...


@dataclasses.dataclass
class SchedulerState:
    """What a policy sees at decision time."""

    now: float
    waiting: Sequence[Request]  # arrival order
    running: Sequence[Request]  # admission order
    paused: Sequence[Request]
    tracker: RequestTracker
    executor: Executor
    # How far behind the engine its clients receive tokens (a recent peak, s): a server measures it where it
    # writes each chunk; the lag's swings are stalls the tracker cannot see, so resumes come this much earlier.
    delivery_lag_s: float = 0.0

    def pages_freed_by(self, request: Request) -> int:
        """Device pages that pausing or dropping `request` frees: a page another request shares stays."""
        return self.executor.pages_freed_by(request)

    def extra_pages_for(self, request: Request, num_new_tokens: int) -> int:
        """Device pages `request` must gain to compute `num_new_tokens` more tokens."""
        extra = pages_for(request.num_computed + num_new_tokens, self.executor.page_size) - len(request.device_pages)
        if request.status is RequestStatus.WAITING:  # cached pages it holds that still count as free
            extra += self.executor.pinned_pages_of(request)
        return extra if extra > 0 else 0


class Policy(Protocol):
    name: str
    uses_write_through: bool  # keeps host copies of running requests' KV (to pause by swap at no cost)

    def plan(self, state: SchedulerState) -> StepPlan: ...
