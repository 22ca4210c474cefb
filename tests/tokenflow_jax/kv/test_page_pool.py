"""Page allocator: the null page is never handed out, reference counts keep shared pages alive; the host tier's
default size."""

from __future__ import annotations

import pytest

from tokenflow_jax.kv.page_pool import OutOfPages, PageAllocator
from tokenflow_jax.kv.pages import default_host_pages, host_memory_bytes


def test_allocate_never_hands_out_the_null_page_and_runs_out_cleanly() -> None:
    pool = PageAllocator(4)
    pages = pool.allocate(4)
    assert sorted(pages) == [1, 2, 3, 4] and pool.num_free == 0 and pool.num_used == 4
    with pytest.raises(OutOfPages):
        pool.allocate(1)
    assert pool.num_used == 4  # a refused allocation takes nothing


def test_a_retained_page_is_freed_only_by_its_last_owner() -> None:
    pool = PageAllocator(3)
    (page,) = pool.allocate(1)
    pool.retain([page])
    assert pool.refcount(page) == 2
    pool.free([page])
    assert pool.num_free == 2 and pool.refcount(page) == 1
    pool.free([page])
    assert pool.num_free == 3
    with pytest.raises(ValueError, match="double free"):
        pool.free([page])
    with pytest.raises(ValueError, match="retain of free page"):
        pool.retain([page])


def test_pool_needs_room_beyond_the_null_page() -> None:
    with pytest.raises(ValueError, match="at least 1 usable page"):
        PageAllocator(0)


def test_a_cached_page_stays_idle_after_its_last_owner_and_is_evicted_least_recently_used() -> None:
    pool = PageAllocator(3)
    evicted: list[int] = []
    pool.on_evict = evicted.append
    a, b, c = pool.allocate(3)
    pool.keep(a)
    pool.keep(b)
    pool.free([b, a, c])  # b idles first, then a; c was never cached: free at once
    assert pool.num_free == 3 and pool.num_idle == 2 and pool.num_used == 0
    assert pool.allocate(1) == [c] and evicted == []  # a free page goes before any cached one
    pool.retain([a])  # a hit holds a again: no longer idle
    assert pool.refcount(a) == 1 and not pool.is_idle(a) and pool.num_free == 1
    assert pool.allocate(1) == [b] and evicted == [b]  # the least recently used idle page is evicted
    with pytest.raises(OutOfPages):
        pool.allocate(1)
    pool.free([a])
    pool.drop_idle()
    assert evicted == [b, a] and pool.num_idle == 0 and pool.num_free == 1
    with pytest.raises(ValueError, match="keep of free page"):
        pool.keep(a)


def test_shared_pages_are_counted_as_they_gain_and_lose_owners() -> None:
    pool = PageAllocator(2)
    a, b = pool.allocate(2)
    pool.retain([a, a, b])
    assert pool.num_shared == 2
    pool.free([a])
    assert pool.num_shared == 2 and pool.refcount(a) == 2
    pool.free([a, b])
    assert pool.num_shared == 0 and pool.num_used == 2


def test_default_host_tier_is_twice_the_device_pool_or_4_gib_and_at_most_a_quarter_of_the_host() -> None:
    gib, page = 1 << 30, 1 << 20  # 1 MiB pages
    # A small pool: the 4 GiB floor decides.
    assert default_host_pages(100, page, host_bytes=64 * gib) == 4096
    # A GPU-sized pool: twice it, while a quarter of the host holds that.
    assert default_host_pages(10_000, page, host_bytes=128 * gib) == 20_000
    # Twice ~56 GB of pages is more than a quarter of a 128 GiB host: the host decides.
    assert default_host_pages(56_000, page, host_bytes=128 * gib) == 32 * 1024
    # A host with under 16 GiB: even the floor is capped.
    assert default_host_pages(100, page, host_bytes=8 * gib) == 2048
    # Without a size given, the machine's own memory caps it.
    assert default_host_pages(10**9, page) == host_memory_bytes() // 4 // page
