"""Which pages a request holds on each tier, and what must move between tiers. Pure bookkeeping.

The real engine and the simulator share this so that both account memory identically; they differ only in
whether a transfer moves arrays or charges modelled time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from tokenflow_jax.kv.page_pool import OutOfPages, PageAllocator
from tokenflow_jax.kv.pages import page_ids, pages_for
from tokenflow_jax.request import Request


@dataclasses.dataclass(frozen=True)
class PageCopy:
    """Copy `src` pages of one tier to `dst` pages of the other, for one request."""

    request_id: str
    src: list[int]
    dst: list[int]


class KVBlockManager:
    def __init__(self, num_device_pages: int, num_host_pages: int, page_size: int) -> None:
        """Usable pages per tier (each pool adds its null page)."""
        self.page_size = page_size
        self.device = PageAllocator(num_device_pages, tier="device")
        # A host tier of 0 pages disables write-through and swap (recompute only).
        self.host = PageAllocator(num_host_pages, tier="host") if num_host_pages else None

    # ---- device tier
    def grow_device(self, req: Request, num_tokens: int) -> None:
        """Give `req` enough device pages to hold `num_tokens` tokens."""
        missing = pages_for(num_tokens, self.page_size) - len(req.device_pages)
        if missing > 0:
            req.device_pages.extend(self.device.allocate(missing))

    def free_device(self, req: Request) -> None:
        self.device.free(req.device_pages)
        req.device_pages = page_ids()

    # ---- host tier
    def free_host(self, req: Request) -> None:
        if self.host is not None:
            self.host.free(req.host_pages)
        req.host_pages = []
        req.num_host_synced = 0

    def _grow_host(self, req: Request, num_pages: int) -> bool:
        missing = num_pages - len(req.host_pages)
        if missing <= 0:
            return True
        if self.host is None or self.host.num_free < missing:
            return False
        req.host_pages.extend(self.host.allocate(missing))
        return True

    def write_through(self, requests: Iterable[Request], budget_pages: int) -> list[PageCopy]:
        """Device->host copies of completed pages not yet on the host, in the given priority order.

        Only full pages are synced here (a page still being filled would be copied again every step);
        the partial tail moves at swap-out.
        """
        copies: list[PageCopy] = []
        for req in requests:
            if budget_pages <= 0:
                break
            first = req.num_host_synced // self.page_size
            full = req.num_computed // self.page_size
            last = min(full, first + budget_pages)
            if last <= first or not self._grow_host(req, last):
                continue
            copies.append(PageCopy(req.request_id, req.device_pages[first:last].tolist(), req.host_pages[first:last]))
            req.num_host_synced = last * self.page_size
            budget_pages -= last - first
        return copies

    def evict_tail(self, req: Request) -> PageCopy | None:
        """Copy whatever the host lacks of `req` so that its device pages can be freed. None: host is full."""
        first = req.num_host_synced // self.page_size
        last = pages_for(req.num_computed, self.page_size)
        if not self._grow_host(req, last):
            return None
        req.num_host_synced = req.num_computed
        if last <= first:
            return PageCopy(req.request_id, [], [])
        return PageCopy(req.request_id, req.device_pages[first:last].tolist(), req.host_pages[first:last])

    def swap_in(self, req: Request) -> PageCopy:
        """Allocate device pages for a paused request's computed tokens; the copy loads them from the host."""
        if req.num_host_synced < req.num_computed:
            raise ValueError(f"{req.request_id}: host copy covers {req.num_host_synced}/{req.num_computed}")
        if req.device_pages:
            raise ValueError(f"{req.request_id}: swap-in while holding device pages")
        n = pages_for(req.num_computed, self.page_size)
        req.device_pages = page_ids(self.device.allocate(n))
        return PageCopy(req.request_id, req.host_pages[:n], req.device_pages.tolist())

    def release(self, req: Request) -> None:
        self.free_device(req)
        self.free_host(req)


__all__ = ["KVBlockManager", "OutOfPages", "PageCopy"]
