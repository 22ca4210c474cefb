"""The real executor: carries out a StepPlan on the JAX runner and the host KV tier."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from tokenflow_jax.batching import SequenceChunk
from tokenflow_jax.config import ModelConfig
from tokenflow_jax.engine.runner import ModelRunner
from tokenflow_jax.kv.block_manager import KVBlockManager, PageCopy
from tokenflow_jax.kv.host_tier import HostKVTier
from tokenflow_jax.model import Params
from tokenflow_jax.scheduler.interface import CostEstimates, StepPlan, StepResult
from tokenflow_jax.scheduler.request import Request


class MovingAverage:
    def __init__(self, initial: float, weight: float = 0.2) -> None:
        self.value, self.weight = initial, weight

    def update(self, x: float) -> float:
        self.value += self.weight * (x - self.value)
        return self.value


class EngineExecutor:
    """Executor over real arrays. KV fields of `Request` (pages, num_computed, host sync) are updated here;
    statuses are the caller's."""

    def __init__(
        self,
        cfg: ModelConfig,
        params: Params,
        *,
        num_device_pages: int,
        num_host_pages: int,
        page_size: int = 16,
        max_num_seqs: int = 32,
        max_batch_tokens: int = 256,
        max_model_len: int = 1024,
        kv_dtype: Any = "float32",
        attention_impl: str = "reference",
        write_through: bool = True,
    ) -> None:
        self.page_size = page_size
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.max_model_len = max_model_len
        self.write_through_enabled = write_through and num_host_pages > 0
        self.runner = ModelRunner(
            cfg, params, num_pages=num_device_pages, page_size=page_size, max_num_seqs=max_num_seqs,
            max_batch_tokens=max_batch_tokens, max_model_len=max_model_len, kv_dtype=kv_dtype,
            attention_impl=attention_impl,
        )  # fmt: skip
        self.blocks = KVBlockManager(num_device_pages, num_host_pages, page_size)
        self.host = HostKVTier(cfg, max(num_host_pages, 2), page_size, kv_dtype) if num_host_pages else None
        self.num_device_pages = self.blocks.device.capacity
        self.num_host_pages = self.blocks.host.capacity if self.blocks.host else 0
        self._decode_step = MovingAverage(0.01)
        self._prefill_per_token = MovingAverage(0.001)
        self._d2h_per_page = MovingAverage(1e-5)
        self._h2d_per_page = MovingAverage(1e-5)
        self.max_transfer_pages = self.runner.buckets.transfer_pages[-1]

    # ---- Executor protocol
    def now(self) -> float:
        return time.monotonic()

    def idle_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            time.sleep(min(delay, 0.05))

    def free_device_pages(self) -> int:
        return self.blocks.device.num_free

    def free_host_pages(self) -> int:
        return self.blocks.host.num_free if self.blocks.host else 0

    def warmup(self, progress: bool = True) -> int:
        return self.runner.warmup(progress)

    def estimates(self) -> CostEstimates:
        pending = self.host.pending_pages if self.host else 0
        step = self._decode_step.value
        return CostEstimates(
            decode_step_s=step,
            prefill_per_token_s=self._prefill_per_token.value,
            swap_out_per_page_s=self._d2h_per_page.value,
            swap_in_per_page_s=self._h2d_per_page.value,
            pending_transfer_s=pending * self._d2h_per_page.value,
            decode_capacity_tok_s=self.max_num_seqs / max(step, 1e-6),
        )

    def execute(self, plan: StepPlan, requests: dict[str, Request]) -> StepResult:
        t0 = time.perf_counter()
        bytes_in0, bytes_out0 = self._host_bytes()
        for rid in plan.recompute_out:
            self.drop(requests[rid])
        for rid in plan.swap_out:
            self.swap_out(requests[rid])
        for rid in plan.swap_in:
            self.swap_in(requests[rid])
        sampled: dict[str, int] = {}
        num_tokens = sum(plan.schedule.values())
        if plan.schedule:
            sampled = self._run(plan, requests, num_tokens)
        elapsed = time.perf_counter() - t0
        if plan.schedule:
            if all(n == 1 for n in plan.schedule.values()):
                self._decode_step.update(elapsed)
            else:
                self._prefill_per_token.update(elapsed / num_tokens)
        bytes_in1, bytes_out1 = self._host_bytes()
        return StepResult(sampled, elapsed, num_tokens, bytes_out1 - bytes_out0, bytes_in1 - bytes_in0)

    def release(self, req: Request) -> None:
        # Queued write-through copies into freed host pages are FIFO-ordered before any later owner's copies.
        self.blocks.release(req)
        req.num_computed = 0

    # ---- KV movement
    def drop(self, req: Request) -> None:
        """Preempt by recompute: forget the request's KV on both tiers."""
        self.blocks.release(req)
        req.num_computed = 0

    def swap_out(self, req: Request) -> bool:
        """Preempt by swap: complete the host copy, then free device pages at once. False: host is full, so the
        request was dropped for recompute instead."""
        copy = self.blocks.evict_tail(req) if self.host else None
        if copy is None:
            self.drop(req)
            return False
        self._copy_to_host(copy)
        self.blocks.free_device(req)
        return True

    def swap_in(self, req: Request) -> None:
        assert self.host is not None
        self.host.flush()  # the host copy must be complete before it is read
        copy = self.blocks.swap_in(req)
        t0 = time.perf_counter()
        for start in range(0, len(copy.src), self.max_transfer_pages):
            src = copy.src[start : start + self.max_transfer_pages]
            self.runner.scatter_pages(copy.dst[start : start + self.max_transfer_pages], self.host.read(src))
        if copy.src:
            self._h2d_per_page.update((time.perf_counter() - t0) / len(copy.src))

    def _copy_to_host(self, copy: PageCopy) -> None:
        assert self.host is not None
        for start in range(0, len(copy.src), self.max_transfer_pages):
            src = copy.src[start : start + self.max_transfer_pages]
            block = self.runner.gather_pages(src)  # dispatched behind the step that wrote these pages
            self.host.write_async(block, copy.dst[start : start + self.max_transfer_pages])

    def _host_bytes(self) -> tuple[int, int]:
        return (self.host.bytes_to_device, self.host.bytes_to_host) if self.host else (0, 0)

    def _write_through(self, order: list[Request]) -> None:
        """Sync completed pages to the host, budgeted to what one step's time can hide."""
        per_page = max(self._d2h_per_page.value, 1e-7)
        budget = int(min(self.max_transfer_pages, max(1, self._decode_step.value / per_page)))
        copies = self.blocks.write_through(order, budget)
        src = [p for c in copies for p in c.src]
        dst = [p for c in copies for p in c.dst]
        if src:
            self._copy_to_host(PageCopy("write-through", src, dst))
            if self.host and self.host.d2h_seconds > 0:
                self._d2h_per_page.value = self.host.d2h_seconds * self.host.page_bytes / max(
                    self.host.bytes_to_host, 1
                )

    def _run(self, plan: StepPlan, requests: dict[str, Request], num_tokens: int) -> dict[str, int]:
        chunks, rows, completing = [], [], []
        for rid, n in plan.schedule.items():
            req = requests[rid]
            if n < 1 or req.num_computed + n > req.num_tokens:
                raise ValueError(f"{rid}: cannot compute {n} tokens ({req.num_computed}/{req.num_tokens} done)")
            start = req.num_computed
            self.blocks.grow_device(req, start + n)
            chunks.append(SequenceChunk(req.token_slice(start, start + n), start, req.device_pages))
            s = req.sampling
            rows.append((s.temperature, s.top_k, s.top_p, req.seed, len(req.output_ids)))
            completing.append(start + n == req.num_tokens)
        tokens = self.runner.run_step(chunks, rows)
        for rid, n in plan.schedule.items():
            requests[rid].num_computed += n
        if self.write_through_enabled:
            order = [requests[rid] for rid in (plan.sync_order or plan.schedule)]
            self._write_through([r for r in order if r.device_pages])
        host_tokens = np.asarray(tokens)  # the one sync point per step
        return {rid: int(host_tokens[i]) for i, rid in enumerate(plan.schedule) if completing[i]}
