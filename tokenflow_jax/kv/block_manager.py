"""Which pages a request holds on each tier, and what must move between tiers. Pure bookkeeping.

The real engine and the simulator share this so that both account memory identically; they differ only in
whether a transfer moves arrays or charges modelled time. With prefix caching, full pages are indexed by
content on each tier (`kv.prefix_cache`) and shared by reference count.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Sequence

from tokenflow_jax.kv.page_pool import OutOfPages, PageAllocator
from tokenflow_jax.kv.pages import page_ids, pages_for
from tokenflow_jax.kv.prefix_cache import PageHash, PageIndex, chain_hashes, root_hash
from tokenflow_jax.request import PENDING_TOKEN, Request


@dataclasses.dataclass(frozen=True)
class PageCopy:
    """Copy `src` pages of one tier to `dst` pages of the other, for one request."""

    request_id: str
    src: list[int]
    dst: list[int]


@dataclasses.dataclass(frozen=True)
class CachedPrefix:
    """Where a request's longest cached prefix lies: full pages on the device, then more on the host only."""

    device_pages: list[int]
    host_pages: list[int]  # the host's cached pages from the first on (may cover the device's too)

    @property
    def host_only(self) -> int:
        """Pages past the device hit that the host holds."""
        return max(0, len(self.host_pages) - len(self.device_pages))


class KVBlockManager:
    def __init__(
        self, num_device_pages: int, num_host_pages: int, page_size: int, *, prefix_caching: bool = False,
        cache_salt: str = "",
    ) -> None:  # fmt: skip
        """Usable pages per tier (each pool adds its null page). `cache_salt` names what else the KV depends on."""
        self.page_size = page_size
        self.device = PageAllocator(num_device_pages, tier="device")
        # A host tier of 0 pages disables write-through and swap (recompute only).
        self.host = PageAllocator(num_host_pages, tier="host") if num_host_pages else None
        self._root = root_hash(f"{cache_salt}|page_size={page_size}")
        self._hashes: dict[str, list[PageHash]] = {}  # request id -> hashes of its first full pages
        self._origins = itertools.count()  # names each computation of a page (`kv.prefix_cache`)
        self.device_index: PageIndex | None = None
        self.host_index: PageIndex | None = None
        self.reset_prefix_cache(prefix_caching)

    @property
    def prefix_caching(self) -> bool:
        return self.device_index is not None

    def reset_prefix_cache(self, enabled: bool) -> None:
        """Empty the cache (pages live requests hold stay theirs) and turn it on or off: a benchmark starts each
        run cold."""
        for pool in (self.device, self.host):
            if pool is not None:
                pool.drop_idle()
                pool.on_evict = None
        self.device_index = PageIndex(self.device) if enabled else None
        self.host_index = PageIndex(self.host) if enabled and self.host is not None else None

    # ---- page hashes
    def page_hashes(self, req: Request, num_tokens: int) -> list[PageHash]:
        """Hashes of the full pages among `req`'s first `num_tokens` tokens (extended as tokens are known)."""
        hashes = self._hashes.setdefault(req.request_id, [])
        full = min(num_tokens, req.num_tokens) // self.page_size
        if len(hashes) < full:
            start = len(hashes) * self.page_size
            tokens = req.token_slice(start, full * self.page_size)
            if PENDING_TOKEN in tokens:  # a token not read yet: its page is not known
                tokens = tokens[: tokens.index(PENDING_TOKEN)]
            hashes += chain_hashes(hashes[-1] if hashes else self._root, tokens, self.page_size)
        return hashes[:full]

    def forget(self, req: Request) -> None:
        """The request is gone: drop its hashes (its cached pages stay indexed)."""
        self._hashes.pop(req.request_id, None)

    def cached_prefix(self, req: Request) -> CachedPrefix:
        """The longest prefix of `req`'s tokens cached on either tier, leaving at least one token to compute (so
        the step that computes it yields logits)."""
        if self.device_index is None:
            return CachedPrefix([], [])
        hashes = self.page_hashes(req, req.num_tokens - 1)
        device = self.device_index.lookup(hashes)
        host = self.host_index.lookup(hashes) if self.host_index is not None else []
        return CachedPrefix(device, host)

    def attach(self, req: Request, prefix: CachedPrefix, num_host_only: int) -> PageCopy | None:
        """Map `req` (holding nothing) onto its cached prefix: the device pages by reference, then
        `num_host_only` more pages loaded from the host (the copy returned). None: no room for the loads."""
        if req.device_pages or req.host_pages or req.num_computed:
            raise ValueError(f"{req.request_id}: attach while holding KV")
        assert self.device_index is not None
        device = prefix.device_pages
        loaded = prefix.host_pages[len(device) : len(device) + num_host_only]
        if len(loaded) + sum(map(self.device.is_idle, device)) > self.device.num_free:  # idle hits count as free
            return None
        self.device.retain(device)
        new = self.device.allocate(len(loaded)) if loaded else []
        req.device_pages = page_ids(device + new)
        req.num_computed = len(req.device_pages) * self.page_size
        hashes = self.page_hashes(req, req.num_computed)
        for h, page, source in zip(hashes[len(device) :], new, loaded, strict=True):  # a load keeps its origin
            self.device_index.insert(h, page, self.host_index.origin(source))  # type: ignore[union-attr]
        if self.host_index is not None:
            # Its host copy: the cached host pages copied from these very device pages, from the first on.
            host = []
            for page, source in zip(req.device_pages, prefix.host_pages, strict=False):
                if self.host_index.origin(source) != self.device_index.origin(page):
                    break
                host.append(source)
            self.host.retain(host)  # type: ignore[union-attr]
            req.host_pages = host
            req.num_host_synced = len(host) * self.page_size
        return PageCopy(req.request_id, list(loaded), new)

    def index_device(self, req: Request, first: int = 0) -> None:
        """Index `req`'s full computed device pages from page `first` on, each a computation of its own (a page
        whose hash is cached already stays unindexed)."""
        if self.device_index is None:
            return
        hashes = self.page_hashes(req, req.num_computed)
        for i in range(first, len(hashes)):
            self.device_index.insert(hashes[i], req.device_pages[i], next(self._origins))

    def _same_origin(self, h: PageHash, device_page: int, host_page: int) -> bool:
        """Whether `host_page` is a copy of `device_page`, the page cached under `h`."""
        assert self.device_index is not None and self.host_index is not None
        return self.device_index.holds(h, device_page) and (
            self.host_index.origin(host_page) == self.device_index.origin(device_page)
        )

    def _index_host_copy(self, h: PageHash, device_page: int, host_page: int) -> None:
        """Index a host page copied from `device_page` when that is the page cached under `h` (its origin)."""
        if self.host_index is not None and self.device_index is not None and self.device_index.holds(h, device_page):
            self.host_index.insert(h, host_page, self.device_index.origin(device_page))

    # ---- device tier
    def grow_device(self, req: Request, num_tokens: int) -> None:
        """Give `req` enough device pages to hold `num_tokens` tokens."""
        missing = pages_for(num_tokens, self.page_size) - len(req.device_pages)
        if missing > 0:
            req.device_pages.extend(self.device.allocate(missing))

    def free_device(self, req: Request) -> None:
        self.device.free(req.device_pages.tolist())
        req.device_pages = page_ids()

    def pages_freed_by(self, req: Request) -> int:
        """Device pages that become free (or idle cached) if `req` lets go of its own: those no one else holds."""
        if not self.prefix_caching:
            return len(req.device_pages)
        refcount = self.device.refcount
        return sum(refcount(p) == 1 for p in req.device_pages)

    def overcount(self, reqs: Sequence[Request]) -> list[float] | None:
        """Per request, how far counting its device pages whole overcounts the pool: the pages it shares, less its
        share of them (so a shared page counts once over its owners). None: no page is shared."""
        if not self.device.num_shared:
            return None
        refcount = self.device.refcount
        return [sum(1.0 - 1.0 / n for p in r.device_pages if (n := refcount(p)) > 1) for r in reqs]

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
        the partial tail moves at swap-out. A page the host tier caches already is shared, not copied.
        """
        copies: list[PageCopy] = []
        for req in requests:
            if budget_pages <= 0:
                break
            first = req.num_host_synced // self.page_size
            full = req.num_computed // self.page_size
            if full <= first:
                continue
            if self.host_index is not None:
                copy, budget_pages = self._write_through_cached(req, first, full, budget_pages)
                if copy is not None:
                    copies.append(copy)
                continue
            last = min(full, first + budget_pages)
            if not self._grow_host(req, last):
                continue
            copies.append(PageCopy(req.request_id, req.device_pages[first:last].tolist(), req.host_pages[first:last]))
            req.num_host_synced = last * self.page_size
            budget_pages -= last - first
        return copies

    def _write_through_cached(self, req: Request, first: int, full: int, budget: int) -> tuple[PageCopy | None, int]:
        assert self.host is not None and self.host_index is not None and self.device_index is not None
        hashes = self.page_hashes(req, full * self.page_size)
        full = min(full, len(hashes))  # (a page holding a token not read yet waits a step)
        src, dst = [], []
        i = first
        while i < full:
            h, device_page = hashes[i], int(req.device_pages[i])
            if i < len(req.host_pages):  # its own page (a partial tail once): copy again, now full
                page = req.host_pages[i]
            elif (hit := self.host_index.get(h)) is not None and self._same_origin(h, device_page, hit):
                # the host holds a copy of this very page already
                self.host.retain([hit])
                req.host_pages.append(hit)
                i += 1
                continue
            elif budget > 0 and self.host.num_free > 0:
                page = self.host.allocate(1)[0]
                req.host_pages.append(page)
            else:
                break
            if budget <= 0:
                break
            src.append(device_page)
            dst.append(page)
            self._index_host_copy(h, device_page, page)
            budget -= 1
            i += 1
        req.num_host_synced = max(req.num_host_synced, i * self.page_size)
        return (PageCopy(req.request_id, src, dst) if src else None), budget

    def evict_tail(self, req: Request) -> PageCopy | None:
        """Copy whatever the host lacks of `req` so that its device pages can be freed. None: host is full."""
        first = req.num_host_synced // self.page_size
        last = pages_for(req.num_computed, self.page_size)
        if not self._grow_host(req, last):
            return None
        req.num_host_synced = req.num_computed
        if last <= first:
            return PageCopy(req.request_id, [], [])
        if self.host_index is not None:
            hashes = self.page_hashes(req, req.num_computed)
            for i in range(first, min(last, len(hashes))):
                self._index_host_copy(hashes[i], int(req.device_pages[i]), req.host_pages[i])
        return PageCopy(req.request_id, req.device_pages[first:last].tolist(), req.host_pages[first:last])

    def swap_in(self, req: Request) -> PageCopy:
        """Give a paused request device pages for its computed tokens: its pages still cached on the device are
        shared again, the rest are allocated and the copy loads them from the host."""
        if req.num_host_synced < req.num_computed:
            raise ValueError(f"{req.request_id}: host copy covers {req.num_host_synced}/{req.num_computed}")
        if req.device_pages:
            raise ValueError(f"{req.request_id}: swap-in while holding device pages")
        n = pages_for(req.num_computed, self.page_size)
        cached: list[int] = []
        if self.device_index is not None and self.host_index is not None:
            # Only the very pages its host copy came from (same origin): it resumes on exactly its own KV.
            for h, source in zip(self.page_hashes(req, req.num_computed), req.host_pages, strict=False):
                page = self.device_index.get(h)
                if page is None or self.device_index.origin(page) != self.host_index.origin(source):
                    break
                cached.append(page)
            self.device.retain(cached)
        new = self.device.allocate(n - len(cached))
        req.device_pages = page_ids(cached + new)
        return PageCopy(req.request_id, req.host_pages[len(cached) : n], new)

    def release(self, req: Request) -> None:
        self.free_device(req)
        self.free_host(req)


__all__ = ["CachedPrefix", "KVBlockManager", "OutOfPages", "PageCopy"]
