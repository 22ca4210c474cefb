"""The host KV tier: a page pool in host memory, a thread that copies device pages into it and one that loads
host pages back onto the device.

Copies run on their own threads because on a GPU a copy issued from the compute thread queues behind the next
step, while one issued from another thread overlaps it (docs/DESIGN.md section 4). Pages are page-major, so a
page is one contiguous piece and a copy of n pages is n contiguous rows on the host. Under tensor parallelism
each device copies its own kv heads' slice of the block into that slice of the host pages; across processes,
each process's tier holds its own devices' slices (the rest of its array is never touched, so never mapped).
"""

from __future__ import annotations

import collections
import concurrent.futures
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from tokenflow_jax.config import ModelConfig

# Device memory that gathered blocks waiting for their copy may hold (more waits): 1 GiB.
MAX_STAGED_BYTES = 1 << 30


class HostKVTier:
    """Pages `[num_pages, layers, 2, Hkv, page_size, head_dim]` in host memory, the layout of a transfer block."""

    def __init__(
        self, cfg: ModelConfig, num_pages: int, page_size: int, dtype: Any, max_staged_bytes: int = MAX_STAGED_BYTES
    ) -> None:
        self.num_pages = num_pages
        shape = (num_pages, cfg.num_layers, 2, cfg.num_kv_heads, page_size, cfg.head_dim)
        # np.zeros maps lazily: untouched host pages cost no memory.
        self.pages = np.zeros(shape, dtype=np.dtype(jax.numpy.dtype(dtype)))
        self.page_bytes = int(np.prod(shape[1:]) * self.pages.itemsize)
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
        self._loads: queue.Queue[tuple[list[int], int | None, Callable, concurrent.futures.Future] | None]
        self._loads = queue.Queue()
        # The copy threads hand the GIL back and forth with the engine thread every step; the default 5 ms
        # switch interval would add up to that much to a step (measured: 1.9x step time at batch 16 on CPU).
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        self._thread = threading.Thread(target=self._copy_loop, name="kv-write-through", daemon=True)
        self._thread.start()
        self._load_thread = threading.Thread(target=self._load_loop, name="kv-load", daemon=True)
        self._load_thread.start()

    # ---- device -> host
    def _copy_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                blocks, host_ids = item
                for block in blocks:
                    block.block_until_ready()
                t0 = time.perf_counter()
                moved, start = 0, 0
                for block in blocks:
                    n = block.shape[0]
                    rows = host_ids[start : start + n]
                    start += n
                    written = set()  # one copy of a replicated slice is enough (this process's, if it spans several)
                    for shard in block.addressable_shards:
                        heads = shard.index[3]
                        if (heads.start, heads.stop) not in written:
                            written.add((heads.start, heads.stop))
                            self.pages[rows, :, :, heads] = np.asarray(shard.data)
                            moved += n
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
    def read(self, host_ids: Sequence[int]) -> np.ndarray:
        """Host pages -> one contiguous `[n, layers, 2, Hkv, S, D]` array, on the calling thread."""
        data = self.pages[list(host_ids)]
        with self._lock:
            self.bytes_to_device += len(host_ids) * self.page_bytes
            self.load_threads[threading.current_thread().name] += 1
        return data

    def loads_by_thread(self) -> collections.Counter[str]:
        """Host reads for the device so far, by the name of the thread that made them."""
        with self._lock:
            return collections.Counter(self.load_threads)

    def load_async(
        self, host_ids: Sequence[int], after: int | None, to_device: Callable[[np.ndarray], Any]
    ) -> concurrent.futures.Future:
        """Load host pages on the load thread once copy `after` (the latest into them) has landed: `to_device`
        turns `read(host_ids)` into device arrays. The future gives (those arrays, seconds from the read to the
        arrays being on the device)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._loads.put((list(host_ids), after, to_device, future))
        return future

    def _load_loop(self) -> None:
        while True:
            item = self._loads.get()
            if item is None:
                return
            host_ids, after, to_device, future = item
            try:
                if after is not None:
                    self.wait(after)
                t0 = time.perf_counter()
                blocks = jax.block_until_ready(to_device(self.read(host_ids)))
                future.set_result((blocks, time.perf_counter() - t0))
            except BaseException as e:  # raised where the step waits for these pages
                future.set_exception(e)

    def close(self) -> None:
        self._queue.put(None)
        self._loads.put(None)
        self._thread.join(timeout=10)
        self._load_thread.join(timeout=10)
