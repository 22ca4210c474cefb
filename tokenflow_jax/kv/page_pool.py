"""Page allocator with reference counts. Page 0 is the null page (`kv.pages`) and is never handed out.

A page the prefix cache indexes (`keep`) is not returned to the free list when its last owner frees it: it
stays idle, holding its KV for a later hit, until an allocation finds no free page and evicts the least
recently used idle page (`on_evict` tells the cache). Idle pages count as free in every figure a policy sees.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from tokenflow_jax.kv.pages import NULL_PAGE, pool_pages


class OutOfPages(RuntimeError):
    pass


class PageAllocator:
    """Free list plus reference counts over `usable_pages` pages, ids 1..usable_pages (0 is the null page)."""

    def __init__(self, usable_pages: int, *, tier: str = "device") -> None:
        if usable_pages < 1:
            raise ValueError(f"{tier} pool needs at least 1 usable page (besides the null page), got {usable_pages}")
        self.tier = tier
        self.num_pages = num_pages = pool_pages(usable_pages)
        self._refcount = [0] * num_pages
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low ids first
        self._kept: set[int] = set()  # pages whose content the prefix cache indexes
        self._idle: OrderedDict[int, None] = OrderedDict()  # kept pages nobody holds, least recently used first
        self.num_shared = 0  # pages more than one owner holds
        self.on_evict: Callable[[int], None] | None = None

    @property
    def capacity(self) -> int:
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._idle)

    @property
    def num_used(self) -> int:
        return self.capacity - self.num_free

    @property
    def num_idle(self) -> int:
        """Cached pages nobody holds (counted in `num_free`)."""
        return len(self._idle)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfPages(f"{self.tier}: asked for {n} pages, {self.num_free} free")
        pages = []
        for _ in range(n):
            if self._free:
                p = self._free.pop()
            else:  # evict the least recently used cached page
                p, _ = self._idle.popitem(last=False)
                self._kept.discard(p)
                if self.on_evict is not None:
                    self.on_evict(p)
            self._refcount[p] = 1
            pages.append(p)
        return pages

    def retain(self, pages: list[int]) -> None:
        """One more owner for each page; an idle cached page is held again."""
        for p in pages:
            if self._refcount[p] <= 0:
                if p not in self._idle:
                    raise ValueError(f"{self.tier}: retain of free page {p}")
                del self._idle[p]
            self._refcount[p] += 1
            if self._refcount[p] == 2:
                self.num_shared += 1

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if p == NULL_PAGE or self._refcount[p] <= 0:
                raise ValueError(f"{self.tier}: double free or null page {p}")
            self._refcount[p] -= 1
            if self._refcount[p] == 1:
                self.num_shared -= 1
            elif self._refcount[p] == 0:
                if p in self._kept:
                    self._idle[p] = None  # most recently used last
                else:
                    self._free.append(p)

    def keep(self, page: int) -> None:
        """The cache indexes `page`: when its last owner frees it, it stays idle instead of free."""
        if self._refcount[page] <= 0:
            raise ValueError(f"{self.tier}: keep of free page {page}")
        self._kept.add(page)

    def drop_idle(self) -> None:
        """Evict every idle cached page (and forget which held pages the cache indexes)."""
        while self._idle:
            p, _ = self._idle.popitem(last=False)
            self._free.append(p)
            if self.on_evict is not None:
                self.on_evict(p)
        self._kept.clear()

    def is_idle(self, page: int) -> bool:
        return page in self._idle

    def refcount(self, page: int) -> int:
        return self._refcount[page]
