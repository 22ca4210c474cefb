"""Page allocator with reference counts. Page 0 is the null page (`kv.pages`) and is never handed out."""

from __future__ import annotations

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

    @property
    def capacity(self) -> int:
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.capacity - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"{self.tier}: asked for {n} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._refcount[p] = 1
        return pages

    def retain(self, pages: list[int]) -> None:
        for p in pages:
            if self._refcount[p] <= 0:
                raise ValueError(f"{self.tier}: retain of free page {p}")
            self._refcount[p] += 1

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if p == NULL_PAGE or self._refcount[p] <= 0:
                raise ValueError(f"{self.tier}: double free or null page {p}")
            self._refcount[p] -= 1
            if self._refcount[p] == 0:
                self._free.append(p)

    def refcount(self, page: int) -> int:
        return self._refcount[page]
