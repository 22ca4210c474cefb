"""Prefix caching: full pages indexed by a hash chained from their parent's hash and their tokens.

A page's hash names its whole prefix (every token before it and in it, and the salt: whatever else changes
the KV, such as the model, the KV dtype and the page size), so a request whose first k pages hash alike can
use the cached pages instead of computing them. One `PageIndex` per tier maps hashes to pages; the tier's
`PageAllocator` keeps indexed pages idle after their last owner leaves and evicts them least recently used.

Each indexed page also records its origin: which computation wrote its KV (a copy or a load keeps the origin).
The same tokens computed in another batch may differ in the last bits, so a request shares a host page only
with the device page it was copied from, and a swap-in reuses a cached device page only if it is the one its
own host copy came from: a paused request resumes on exactly the KV it had.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

from tokenflow_jax.kv.page_pool import PageAllocator

PageHash = bytes


def root_hash(salt: str) -> PageHash:
    """The parent of every first page: a cache serves only KV computed the same way."""
    return hashlib.sha256(salt.encode()).digest()


def chain_hashes(parent: PageHash, tokens: Sequence[int], page_size: int) -> list[PageHash]:
    """Hashes of the full pages of `tokens`, each chained from the one before (sha256: a collision would serve
    another prompt's KV)."""
    hashes = []
    for start in range(0, len(tokens) - page_size + 1, page_size):
        parent = hashlib.sha256(parent + array("q", tokens[start : start + page_size]).tobytes()).digest()
        hashes.append(parent)
    return hashes


class PageIndex:
    """Hash -> page for one tier's cached pages; evictions in the allocator remove entries."""

    def __init__(self, pages: PageAllocator) -> None:
        self.pages = pages
        self._page_of: dict[PageHash, int] = {}
        self._hash_of: dict[int, PageHash] = {}
        self._origin_of: dict[int, int] = {}
        pages.on_evict = self._forget

    def __len__(self) -> int:
        return len(self._page_of)

    def get(self, h: PageHash) -> int | None:
        return self._page_of.get(h)

    def lookup(self, hashes: Sequence[PageHash]) -> list[int]:
        """The cached pages of the longest prefix of `hashes`."""
        found = []
        for h in hashes:
            p = self._page_of.get(h)
            if p is None:
                break
            found.append(p)
        return found

    def insert(self, h: PageHash, page: int, origin: int) -> bool:
        """Index a held page whose content `h` names, written by computation `origin`; a hash already cached
        keeps its page (False)."""
        if h in self._page_of or page in self._hash_of:
            return False
        self._page_of[h] = page
        self._hash_of[page] = h
        self._origin_of[page] = origin
        self.pages.keep(page)
        return True

    def hash_of(self, page: int) -> PageHash | None:
        return self._hash_of.get(page)

    def holds(self, h: PageHash, page: int) -> bool:
        """Whether `page` is the one cached under `h`."""
        return self._page_of.get(h) == page

    def origin(self, page: int) -> int:
        """The computation an indexed page's KV comes from (-1: not indexed)."""
        return self._origin_of.get(page, -1)

    def _forget(self, page: int) -> None:
        h = self._hash_of.pop(page, None)
        if h is not None:
            del self._page_of[h]
            del self._origin_of[page]
