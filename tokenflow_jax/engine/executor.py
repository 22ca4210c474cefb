"""The real executor: carries out a StepPlan on the JAX runner and the host KV tier."""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from tokenflow_jax.batching import SequenceChunk
from tokenflow_jax.config import ModelConfig
from tokenflow_jax.engine.multihost import DeviceOp, OpBroadcast, message_size
from tokenflow_jax.engine.paged_executor import PagedExecutor, SamplingRow
from tokenflow_jax.engine.runner import ModelRunner
from tokenflow_jax.kv.block_manager import PageCopy
from tokenflow_jax.kv.host_tier import HostKVTier
from tokenflow_jax.kv.pages import pool_pages
from tokenflow_jax.model import Params
from tokenflow_jax.request import PENDING_TOKEN


class EngineExecutor(PagedExecutor):
    """The real executor: the JAX runner's jitted steps and the host KV tier's copies."""

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
        pipelined: bool = True,
        prefix_caching: bool = False,
        cache_salt: str = "",
        mesh: Mesh | None = None,
        host_memory: str | None = None,
    ) -> None:
        self.runner = ModelRunner(
            cfg, params, num_pages=pool_pages(num_device_pages), page_size=page_size, max_num_seqs=max_num_seqs,
            max_batch_tokens=max_batch_tokens, max_model_len=max_model_len, kv_dtype=kv_dtype,
            attention_impl=attention_impl, mesh=mesh,
        )  # fmt: skip
        super().__init__(
            num_device_pages=num_device_pages, num_host_pages=num_host_pages, page_size=page_size,
            max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens, max_model_len=max_model_len,
            write_through=write_through, max_transfer_pages=self.runner.buckets.transfer_pages[-1],
            prefix_caching=prefix_caching, cache_salt=cache_salt,
        )  # fmt: skip
        self.host = HostKVTier(
            cfg, pool_pages(num_host_pages), page_size, kv_dtype, mesh=self.runner.mesh,
            transfer_pages=self.runner.buckets.transfer_pages, host_memory=host_memory,
        ) if num_host_pages else None  # fmt: skip
        self.pipelined = pipelined
        # Host->device loads under way on the tier's load thread: (device pages, their future); the step that
        # needs them waits for them, and their scatters are dispatched before it (`_finish_loads`).
        self._loading: list[tuple[list[int], Any]] = []
        # The leader of a mesh that spans processes tells its followers every device operation before issuing it.
        spans_processes = any(d.process_index != jax.process_index() for d in self.runner.mesh.devices.flat)
        leads = spans_processes and jax.process_index() == 0
        self.followers = OpBroadcast(message_size(self.runner)) if leads else None

    def now(self) -> float:
        return time.monotonic()

    def idle_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            time.sleep(min(delay, 0.05))

    def warmup(self, progress: bool = True) -> int:
        if self.followers is not None:
            self.followers.send(DeviceOp.WARMUP)
        if self.host is not None:
            self.host.compile()
        return self.runner.warmup(progress)

    def _compute(self, chunks: list[SequenceChunk], rows: list[SamplingRow], request_ids: list[str]) -> Any:
        pending = [i for i, c in enumerate(chunks) if c.token_ids[-1] == PENDING_TOKEN]
        feeds, previous_tokens = None, None
        if pending:
            previous = self._in_flight  # always the latest step dispatched: a follower's latest step too
            assert previous is not None, "a pending token without a step in flight"
            row_of = {rid: i for i, rid in enumerate(previous.request_ids)}
            # The token is still on the device: the step reads it from the previous step's output.
            feeds = {i: row_of[request_ids[i]] for i in pending}
            previous_tokens = previous.handle
        key, batch = self.runner.step_batch(chunks, rows, feeds)
        self._finish_loads()  # built while the loads ran; the step waits only for the pages it resumes
        if self.followers is not None:
            self.followers.send_step(key, batch, feeds is not None)
        return self.runner.run_batch(key, batch, previous_tokens)

    def _sampled_tokens(self, handle: Any) -> list[int]:
        if self.followers is not None:
            handle = handle.addressable_data(0)  # replicated over every process's devices: read this one's copy
        return [int(t) for t in np.asarray(handle)]  # the one host sync per step

    def _copy_to_host(self, copy: PageCopy) -> int:
        assert self.host is not None
        self._finish_loads()  # a host page a load still reads may be written next
        if self.followers is not None:
            self.followers.send_copy(DeviceOp.TO_HOST, copy.src, copy.dst)
        block = self.runner.gather_pages(copy.src)  # dispatched behind the step that wrote these pages
        ticket = self.host.write_async(block, copy.dst)
        self.bytes_to_host += len(copy.src) * self.host.page_bytes
        if self.host.d2h_seconds > 0:
            self._d2h_per_page.value = self.host.d2h_seconds * self.host.page_bytes / max(self.host.bytes_to_host, 1)
        return ticket

    def _flush_to_host(self) -> None:
        if self.host is not None:
            self.host.flush()

    def _await_host_copy(self, ticket: int | None) -> None:
        if self.host is not None and ticket is not None:
            self.host.wait(ticket)

    def _load(self, copy: PageCopy) -> None:
        """Start loading host pages on the tier's load thread (prefetch): the engine thread goes on with the
        evictions and the step's batch, and waits for these pages just before the step (`_finish_loads`).
        Followers of a multi-process mesh carry out every device operation in the leader's order: loaded here."""
        if self.host is None or self.followers is not None or not copy.src:
            super()._load(copy)
            return
        tickets = [t for p in copy.src if (t := self._host_ticket.get(p)) is not None]
        after = max(tickets) if tickets else None  # the latest copy into these pages: FIFO, so every earlier one
        step = self.max_transfer_pages
        for start in range(0, len(copy.src), step):
            src, dst = copy.src[start : start + step], copy.dst[start : start + step]
            self._loading.append((dst, self.host.load_async(src, after)))
            self.bytes_to_device += len(src) * self.host.page_bytes

    def _finish_loads(self) -> None:
        """Wait for the loads under way and dispatch their scatters, in the order they were started; their time,
        measured on the load thread from the host read to the data on the device, feeds the estimates."""
        loading, self._loading = self._loading, []
        for dst, future in loading:
            blocks, seconds = future.result()
            self.runner.scatter_staged(dst, blocks)
            self._h2d_per_page.update(seconds / len(dst))

    def _load_to_device(self, copy: PageCopy) -> None:
        assert self.host is not None
        if self.followers is not None:
            self.followers.send_copy(DeviceOp.TO_DEVICE, copy.dst, copy.src)
        self.runner.scatter_staged(copy.dst, self.host.load(copy.src))
        self.bytes_to_device += len(copy.src) * self.host.page_bytes

    def _pending_to_host_pages(self) -> int:
        return self.host.pending_pages if self.host else 0

    def close(self) -> None:
        self._loading.clear()
        if self.followers is not None:
            self.followers.send(DeviceOp.SHUTDOWN)
            self.followers = None
        if self.host is not None:
            self.host.close()
