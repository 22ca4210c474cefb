"""The host KV tier: a page pool in host memory, a thread that copies device pages into it and one that loads
host pages back onto the device.

Copies run on their own threads because on a GPU a copy issued from the compute thread queues behind the next
step, while one issued from another thread overlaps it (docs/DESIGN.md section 4). Pages are page-major, so a
page is one contiguous piece and a copy of n pages is n contiguous rows on the host. The pages live in pinned
host memory or in numpy (`kv.host_pool`, chosen at start-up); under tensor parallelism each device copies its
own kv heads' slice of the block into that slice of the host pages; across processes, each process's tier holds
its own devices' slices (numpy: the rest of its array is never touched, so never mapped).
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import logging
import queue
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from tokenflow_jax.config import ModelConfig
from tokenflow_jax.kv.host_pool import ASKED, POOLS, failure
from tokenflow_jax.kv.host_pool import host_memory as host_memory_for
from tokenflow_jax.kv.pages import transfer_slices
from tokenflow_jax.parallel import block_sharding, make_mesh

logger = logging.getLogger(__name__)

# Device memory that gathered blocks waiting for their copy may hold (more waits): 1 GiB.
MAX_STAGED_BYTES = 1 << 30

_open_tiers: weakref.WeakSet[HostKVTier] = weakref.WeakSet()


@atexit.register
def _close_open_tiers() -> None:
    """Let queued copies land before the interpreter exits: a copy thread still inside XLA (a pinned pool's
    scatter) when Python stops its daemon threads aborts the process."""
    for tier in list(_open_tiers):
        tier.close()


class HostKVTier:
    """Pages `[num_pages, layers, 2, Hkv, page_size, head_dim]` in host memory, the layout of a transfer block.

    `mesh`: the devices whose blocks it copies (default: one). `transfer_pages`: the copy sizes the runner
    compiled (ascending, from 1; default: powers of two); reads are cut into them, so the pinned pool compiles
    nothing else. `host_memory`: "pinned_host", "numpy" or "auto" (`kv.host_pool.host_memory`)."""

    def __init__(
        self,
        cfg: ModelConfig,
        num_pages: int,
        page_size: int,
        dtype: Any,
        max_staged_bytes: int = MAX_STAGED_BYTES,
        *,
        mesh: Mesh | None = None,
        transfer_pages: Sequence[int] | None = None,
        host_memory: str | None = None,
    ) -> None:
        self.num_pages = num_pages
        mesh = make_mesh(1) if mesh is None else mesh
        self.shape = (num_pages, cfg.num_layers, 2, cfg.num_kv_heads, page_size, cfg.head_dim)
        self.dtype = np.dtype(jax.numpy.dtype(dtype))
        self.memory_kind, why = host_memory_for(mesh, host_memory)
        self.page_bytes = int(np.prod(self.shape[1:]) * self.dtype.itemsize)
        refused = False
        try:
            self._pool = POOLS[self.memory_kind](self.shape, dtype, mesh)
        except Exception as e:
            if self.memory_kind == "numpy" or why == ASKED:
                raise
            # Chosen, not asked for: the probe's round trip is small, and a whole pool of pinned memory can still
            # be refused (a container's locked-memory limit). Plain host memory serves, slower to copy.
            refused, why = True, f"the whole pool in pinned_host memory failed ({failure(e)})"
            self.memory_kind = "numpy"
            self._pool = POOLS["numpy"](self.shape, dtype, mesh)
        # Only a fallback on an accelerator, where pinned memory is what makes copies fast, is worth a warning.
        fallback = self.memory_kind == "numpy" and why != ASKED and (refused or jax.default_backend() != "cpu")
        logger.log(
            logging.WARNING if fallback else logging.INFO,
            "host KV tier: %d pages (%.1f MiB) in %s memory (%s)",
            num_pages, num_pages * self.page_bytes / 2**20, self.memory_kind, why,
        )  # fmt: skip
        self.transfer_pages = tuple(transfer_pages or [1 << i for i in range(max(1, num_pages).bit_length())])
        self._block_sharding = block_sharding(mesh)
        self.max_staged_pages = max(1, max_staged_bytes // self.page_bytes)
        self.bytes_to_host = 0
        self.bytes_to_device = 0
        self.d2h_seconds = 0.0  # from a gather's completion to its pages landing in host memory
        self.pages_moved_to_host = 0  # pages that crossed to the host (per kv-head slice): exactly those asked for
        self.load_threads: collections.Counter[str] = collections.Counter()  # thread name -> host reads it loaded
        self._pending_pages = 0
        self._lock = threading.Lock()
        # Copies are numbered as queued (tickets); FIFO, so the first `_landed` of them are in host memory.
        self._issued = 0
        self._landed = 0
        self._landed_cv = threading.Condition(self._lock)
        self._error: BaseException | None = None
        self._queue: queue.Queue[tuple[list[Any], list[int]] | None] = queue.Queue()
        self._loads: queue.Queue[tuple[list[int], int | None, concurrent.futures.Future] | None]
        self._loads = queue.Queue()
        # The copy threads hand the GIL back and forth with the engine thread every step; the default 5 ms
        # switch interval would add up to that much to a step (measured: 1.9x step time at batch 16 on CPU).
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        self._thread = threading.Thread(target=self._copy_loop, name="kv-write-through", daemon=True)
        self._thread.start()
        self._load_thread = threading.Thread(target=self._load_loop, name="kv-load", daemon=True)
        self._load_thread.start()
        _open_tiers.add(self)

    # ---- device -> host
    def _copy_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                blocks, host_ids = item
                blocks = [block.block_until_ready() for block in blocks]
                t0 = time.perf_counter()
                moved, start = 0, 0
                for block in blocks:
                    n = block.shape[0]
                    moved += self._pool.write(host_ids[start : start + n], block)
                    start += n
                with self._lock:
                    self.d2h_seconds += time.perf_counter() - t0
                    self.bytes_to_host += len(host_ids) * self.page_bytes
                    self.pages_moved_to_host += moved
            except BaseException as e:  # surfaced on the next flush or wait
                self._error = e
            finally:
                if item is not None:
                    with self._landed_cv:
                        self._pending_pages -= len(item[1])
                        self._landed += 1
                        self._landed_cv.notify_all()
                self._queue.task_done()

    def write_async(self, device_blocks: jax.Array | Sequence[jax.Array], host_ids: Sequence[int]) -> int:
        """Queue a copy of already-dispatched device gathers (page-major blocks whose pages, in order, go to
        `host_ids`) into host pages, FIFO; returns its ticket for `wait`. Waits while the blocks already queued
        hold `max_staged_pages` (each holds device memory until it lands)."""
        blocks = [device_blocks] if hasattr(device_blocks, "block_until_ready") else list(device_blocks)
        n = len(host_ids)
        with self._landed_cv:
            while self._pending_pages and self._pending_pages + n > self.max_staged_pages:
                self._landed_cv.wait()
            self._pending_pages += n
            self._issued += 1
            ticket = self._issued
        self._queue.put((blocks, list(host_ids)))
        return ticket

    def wait(self, ticket: int) -> None:
        """Wait until copy `ticket` and every copy queued before it have landed, not for later ones (a paused
        request's pages were written long before the copies the running ones queue every step)."""
        with self._landed_cv:
            while self._landed < ticket:
                self._landed_cv.wait()
        self._raise_failed()

    def flush(self) -> None:
        """Wait for every queued copy; the host pages are then current."""
        self._queue.join()
        self._raise_failed()

    def _raise_failed(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError("write-through copy failed") from err

    @property
    def pending_pages(self) -> int:
        return self._pending_pages

    # ---- host -> device
    def _pieces(self, host_ids: Sequence[int]) -> list[list[int]]:
        """`host_ids` cut into the transfer sizes, in order."""
        ids = list(host_ids)
        return [ids[piece] for piece in transfer_slices(len(ids), self.transfer_pages)]

    def _count_load(self, num_pages: int) -> None:
        with self._lock:
            self.bytes_to_device += num_pages * self.page_bytes
            self.load_threads[threading.current_thread().name] += 1

    def host_pages(self, host_ids: Sequence[int]) -> np.ndarray:
        """Host pages as one numpy array `[n, layers, 2, Hkv, S, D]`, for checks (not counted as a load)."""
        pieces = [self._pool.host_pages(piece) for piece in self._pieces(host_ids)]
        return np.concatenate(pieces) if pieces else np.zeros((0, *self.shape[1:]), self.dtype)

    def load(self, host_ids: Sequence[int]) -> list[jax.Array]:
        """Host pages -> device blocks, one per transfer piece (each exactly its pages, one transfer), on the
        calling thread; dispatched, not waited for."""
        self._count_load(len(host_ids))
        return [self._pool.to_device(piece, self._block_sharding) for piece in self._pieces(host_ids)]

    def compile(self) -> None:
        """Compile every transfer size's host programs (the pinned pool's scatter and gather) before serving: those
        a copy can use (no piece holds more pages than the tier)."""
        self._pool.compile([n for n in self.transfer_pages if n <= self.num_pages])

    def loads_by_thread(self) -> collections.Counter[str]:
        """Host reads for the device so far, by the name of the thread that made them."""
        with self._lock:
            return collections.Counter(self.load_threads)

    def load_async(self, host_ids: Sequence[int], after: int | None) -> concurrent.futures.Future:
        """`load(host_ids)` on the load thread once copy `after` (the latest into them) has landed. The future
        gives (the device blocks, seconds from the host read to the blocks being on the device)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._loads.put((list(host_ids), after, future))
        return future

    def _load_loop(self) -> None:
        while True:
            item = self._loads.get()
            if item is None:
                return
            host_ids, after, future = item
            try:
                if after is not None:
                    self.wait(after)
                t0 = time.perf_counter()
                blocks = jax.block_until_ready(self.load(host_ids))
                future.set_result((blocks, time.perf_counter() - t0))
            except BaseException as e:  # raised where the step waits for these pages
                future.set_exception(e)

    def close(self) -> None:
        """Stop both threads once the copies queued before have landed."""
        _open_tiers.discard(self)
        self._queue.put(None)
        self._loads.put(None)
        self._thread.join(timeout=10)
        self._load_thread.join(timeout=10)
