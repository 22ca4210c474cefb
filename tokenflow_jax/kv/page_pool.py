"""Page allocator with reference counts. Page 0 is the null page and is never handed out."""

from __future__ import annotations


class OutOfPages(RuntimeError):
    pass


class PageAllocator:
    """Free list plus reference counts over pages 1..num_pages-1 (page 0 is reserved)."""

    def __init__(self, num_pages: int, *, tier: str = "device") -> None:
        if num_pages < 2:
            raise ValueError(f"{tier} pool needs at least 2 pages (page 0 is the null page), got {num_pages}")
        self.tier = tier
        self.num_pages = num_pages
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
            if p == 0 or self._refcount[p] <= 0:
                raise ValueError(f"{self.tier}: double free or null page {p}")
            self._refcount[p] -= 1
            if self._refcount[p] == 0:
                self._free.append(p)

    def refcount(self, page: int) -> int:
        return self._refcount[page]
