"""`SimExecutor`: the engine's page bookkeeping on a virtual clock, with a cost model instead of a GPU.

It carries out StepPlans exactly as the real executor does (same `PagedExecutor`, same `KVBlockManager`), so
a policy cannot tell the two apart except by speed. Time has three timelines:
- compute: each step advances the clock by `SimProfile.step_time` of its batch;
- copy engine (device -> host): write-through copies and swap-outs' unsynced tails queue here and overlap
  compute. As in the engine, a swap-out frees its device pages at once (the engine gathers the tail into a
  block of its own on the device, in stream order, before any later step can write those pages). Without
  write-through (`write_through=False`) a swap-out copies what the host lacks of the request's KV. With
  `swap_out_copies_whole_kv`, as in the paper's system without write-through, no host copy is kept once a
  request is back on the device, so every swap-out copies its whole KV, and its pages stay held until that copy
  lands: the next step waits for it (the ablation of write-through sets both);
- load engine (host -> device): swap-ins queue here and overlap compute, each no earlier than its request's
  host copy has landed, and the step that first runs a loaded request cannot end before its pages arrive.
  (Simplification: that holds back the whole batch, which only matters when a load outlasts a step; a
  2k-token Llama-3-8B request loads in ~6 ms.)
Sampled tokens are dummies (`token_id`); give requests `ignore_eos` or a length and they run to max_tokens.

`overlap_transfers=False` is the ablation of the evict-load overlap: evictions and loads share one timeline (one
copy engine for both directions, so a load waits for every eviction queued before it and the other way round),
and that timeline is serialised with compute: the next step starts only once the swap-outs and loads issued
before it have landed. Write-through copies stay beside compute (their chunks are sized to hide in a step).

`slowdown` makes the machine slower (or faster) part way through a run, as contention or thermal limits do: from
each listed time on, every step costs that factor times the profile's. A policy learns it only by measuring.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenflow_jax.batching import SequenceChunk
from tokenflow_jax.engine.paged_executor import PagedExecutor, SamplingRow
from tokenflow_jax.engine.step_model import DecodeStepModel
from tokenflow_jax.kv.block_manager import PageCopy
from tokenflow_jax.kv.pages import pages_for
from tokenflow_jax.request import Request
from tokenflow_jax.sim.profiles import SimProfile, load_profile


def batch_terms(chunks: Sequence[SequenceChunk]) -> tuple[int, int, int, float]:
    """A step's terms of the cost model (`SimProfile.step_time`): batch tokens, context tokens, prefill tokens
    and prefill attention pairs."""
    tokens = context = prefill = 0
    pairs = 0.0
    for c in chunks:
        n = len(c.token_ids)
        tokens += n
        context += c.start + n
        if n > 1:
            prefill += n
            pairs += n * (c.start + n / 2)
    return tokens, context, prefill, pairs


class SimExecutor(PagedExecutor):
    def __init__(
        self,
        profile: str | Path | SimProfile = "h100-llama3-8b",
        tensor_parallel_size: int = 1,  # GPUs a built-in profile's model is split over (`sim.tensor_parallel`)
        *,
        num_device_pages: int | None = None,
        num_host_pages: int | None = None,
        page_size: int = 16,
        max_num_seqs: int = 256,
        max_batch_tokens: int = 8192,
        max_model_len: int = 8192,
        write_through: bool = True,
        token_id: int = 1,
        slowdown: Sequence[tuple[float, float]] = (),
        overlap_transfers: bool = True,
        swap_out_copies_whole_kv: bool = False,
    ) -> None:
        self.profile = load_profile(profile, tensor_parallel_size)
        self.slowdown = sorted((float(t), float(f)) for t, f in slowdown)
        if any(not f > 0 for _, f in self.slowdown):
            raise ValueError(f"slowdown factors must be > 0, got {slowdown!r}")
        device = self.profile.device_pages(page_size) if num_device_pages is None else num_device_pages
        host = self.profile.host_pages(page_size) if num_host_pages is None else num_host_pages
        super().__init__(
            num_device_pages=device, num_host_pages=host, page_size=page_size,
            max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens, max_model_len=max_model_len,
            write_through=write_through,
        )  # fmt: skip
        self.token_id = token_id
        self.overlap_transfers = overlap_transfers
        self.swap_out_copies_whole_kv = swap_out_copies_whole_kv
        self.page_bytes = self.profile.page_bytes(page_size)
        self.clock = 0.0
        self.copy_free_at = 0.0  # when the device->host copy engine drains its backlog
        self.load_free_at = 0.0  # when the host->device loads issued so far have landed
        self._loads_pending = False
        self._host_copy_landed_at = 0.0  # set by each swap-in (`_await_host_copy`): its loads start no earlier
        self._step_held_until = 0.0  # transfers the next step must wait for (only with a part switched off)
        self._writing_through = False
        self.steps = 0
        self.busy_s = 0.0  # compute time, for utilization
        self.held_s = 0.0  # time steps waited for swap transfers (only with a part switched off)
        self._d2h_page_s = self.profile.d2h_latency_s / 64 + self.page_bytes / self.profile.d2h_bytes_per_s
        self._h2d_page_s = self.profile.h2d_latency_s / 64 + self.page_bytes / self.profile.h2d_bytes_per_s
        self._d2h_per_page.value = self._d2h_page_s
        self._h2d_per_page.value = self._h2d_page_s
        # Until a pure decode step is measured, assume a full batch at 1k context: Gamma starts conservative.
        self._decode_step.value = self.profile.step_time(max_num_seqs, max_num_seqs * 1024)
        self._prefill_per_token.value = self.profile.step_time(512, 512, 512, 512 * 512 / 2) / 512
        # The simulator knows its own cost model: only the machine's speed is measured.
        prof = self.profile
        self.decode_model = DecodeStepModel(
            refit_every=None, fitted=(prof.step_base_s, prof.step_per_token_s, prof.step_per_context_token_s)
        )

    # ---- time
    def now(self) -> float:
        return self.clock

    def idle_until(self, t: float) -> None:
        self.clock = max(self.clock, t)

    def _pending_to_host_pages(self) -> int:
        backlog = self.copy_free_at - self.clock
        return 0 if backlog <= 0 else int(pages_for(backlog, self._d2h_page_s))  # pages the backlog still holds

    # (Policies ask for estimates every iteration: these override the parts, not `dataclasses.replace` the
    # whole, which costs tens of microseconds.)
    def _pending_transfer_s(self) -> float:
        # Loads queue too: a new swap waits for both engines' backlogs.
        return super()._pending_transfer_s() + max(0.0, self.load_free_at - self.clock)

    def speed_factor(self, t: float) -> float:
        """The `slowdown` factor in force at time t (1 before the first)."""
        i = bisect.bisect_right(self.slowdown, (t, float("inf")))
        return self.slowdown[i - 1][1] if i else 1.0

    # ---- compute
    def step_time(self, chunks: list[SequenceChunk]) -> float:
        return self.profile.step_time(*batch_terms(chunks)) * self.speed_factor(self.clock)

    def _compute(
        self, chunks: list[SequenceChunk], rows: list[SamplingRow], request_ids: list[str] | None = None
    ) -> Any:
        elapsed = self.step_time(chunks)
        start = max(self.clock, self._step_held_until)
        self.held_s += start - self.clock
        end = start + elapsed
        if self._loads_pending:  # the loaded requests cannot run before their pages land
            end = max(end, self.load_free_at)
            self._loads_pending = False
        self.busy_s += elapsed
        self.steps += 1
        self.clock = end
        return len(chunks)

    def _sampled_tokens(self, handle: Any) -> list[int]:
        return [self.token_id] * handle

    # ---- transfers
    def _copy_to_host(self, copy: PageCopy) -> float:
        """Returns when the copy lands (the ticket a swap-in of its request waits for)."""
        nbytes = len(copy.src) * self.page_bytes
        start = max(self.copy_free_at, self.clock, 0.0 if self.overlap_transfers else self.load_free_at)
        self.copy_free_at = start + self.profile.d2h_latency_s + nbytes / self.profile.d2h_bytes_per_s
        self.bytes_to_host += len(copy.src) * self.page_bytes
        if not self._writing_through and (self.swap_out_copies_whole_kv or not self.overlap_transfers):
            self._step_held_until = max(self._step_held_until, self.copy_free_at)  # a swap-out's pages are held
        return self.copy_free_at

    def _write_through(self, order: list[Request]) -> None:
        self._writing_through = True  # these copies never hold a step
        try:
            super()._write_through(order)
        finally:
            self._writing_through = False

    def _flush_to_host(self) -> None:
        self._host_copy_landed_at = self.copy_free_at

    def _await_host_copy(self, ticket: float | None) -> None:
        self._host_copy_landed_at = ticket or 0.0  # loads wait on the load engine's timeline, not the clock

    def _load_to_device(self, copy: PageCopy) -> None:
        nbytes = len(copy.src) * self.page_bytes
        start = max(self.load_free_at, self.clock, self._host_copy_landed_at,
                    0.0 if self.overlap_transfers else self.copy_free_at)  # fmt: skip
        self.load_free_at = start + self.profile.h2d_latency_s + nbytes / self.profile.h2d_bytes_per_s
        self.bytes_to_device += len(copy.src) * self.page_bytes
        self._loads_pending = True
        if not self.overlap_transfers:
            self._step_held_until = max(self._step_held_until, self.load_free_at)

    def swap_in(self, req: Request) -> None:
        super().swap_in(req)
        if self.swap_out_copies_whole_kv:  # the host copy is let go once loaded: the next pause copies it all
            self.blocks.free_host(req)

    def _load(self, copy: PageCopy) -> None:
        super()._load(copy)
        # The base measures the load on the clock, but loads run on their own timeline here.
        self._h2d_per_page.value = self._h2d_page_s
