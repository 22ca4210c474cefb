"""The host KV tier: a page pool in host memory and a background thread that copies device pages into it.

Copies run on their own thread because on a GPU a device->host copy issued from the compute thread queues
behind the next step, while one issued from another thread overlaps it (docs/DESIGN.md section 4). Under tensor
parallelism each device copies its own kv heads' slice of the block into that slice of the host pages; across
processes, each process's tier holds its own devices' slices (the rest of its array is never touched, so never
mapped).
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from tokenflow_jax.config import ModelConfig


class HostKVTier:
    """Pages `[layers, 2, Hkv, num_pages, page_size, head_dim]` in host memory, same layout as a transfer block."""

    def __init__(self, cfg: ModelConfig, num_pages: int, page_size: int, dtype: Any) -> None:
        self.num_pages = num_pages
        shape = (cfg.num_layers, 2, cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
        # np.zeros maps lazily: untouched host pages cost no memory.
        self.pages = np.zeros(shape, dtype=np.dtype(jax.numpy.dtype(dtype)))
        self.page_bytes = int(np.prod(shape) // num_pages * self.pages.itemsize)
        self.bytes_to_host = 0
        self.bytes_to_device = 0
        self.d2h_seconds = 0.0
        self._pending_pages = 0
        self._lock = threading.Lock()
        # Copies are numbered as queued (tickets); FIFO, so the first `_landed` of them are in host memory.
        self._issued = 0
        self._landed = 0
        self._landed_cv = threading.Condition(self._lock)
        self._error: BaseException | None = None
        self._queue: queue.Queue[tuple[jax.Array, list[int]] | None] = queue.Queue()
        # The copy thread hands the GIL back and forth with the engine thread every step; the default 5 ms
        # switch interval would add up to that much to a step (measured: 1.9x step time at batch 16 on CPU).
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        self._thread = threading.Thread(target=self._copy_loop, name="kv-write-through", daemon=True)
        self._thread.start()

    def _copy_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                block, host_ids = item
                block.block_until_ready()
                t0 = time.perf_counter()
                written = set()  # one copy of a replicated slice is enough (this process's copy, if it spans several)
                for shard in block.addressable_shards:
                    heads = shard.index[2]
                    if (heads.start, heads.stop) not in written:
                        written.add((heads.start, heads.stop))
                        self.pages[:, :, heads, host_ids] = np.asarray(shard.data)[:, :, :, : len(host_ids)]
                with self._lock:
                    self.d2h_seconds += time.perf_counter() - t0
                    self.bytes_to_host += len(host_ids) * self.page_bytes
                    self._pending_pages -= len(host_ids)
            except BaseException as e:  # surfaced on the next flush or wait
                self._error = e
            finally:
                if item is not None:
                    with self._landed_cv:
                        self._landed += 1
                        self._landed_cv.notify_all()
                self._queue.task_done()

    def write_async(self, device_block: jax.Array, host_ids: Sequence[int]) -> int:
        """Queue a copy of an already-dispatched device gather into host pages (FIFO order); returns its ticket
        for `wait`."""
        with self._lock:
            self._pending_pages += len(host_ids)
            self._issued += 1
            ticket = self._issued
        self._queue.put((device_block, list(host_ids)))
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

    def read(self, host_ids: Sequence[int]) -> np.ndarray:
        data = self.pages[:, :, :, list(host_ids)]
        self.bytes_to_device += len(host_ids) * self.page_bytes
        return data

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
