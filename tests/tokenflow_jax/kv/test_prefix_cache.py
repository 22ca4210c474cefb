"""Page hashes name a page's whole prefix; the index serves the longest cached prefix and forgets evicted pages."""

from __future__ import annotations

from tokenflow_jax.kv.page_pool import PageAllocator
from tokenflow_jax.kv.prefix_cache import PageIndex, chain_hashes, root_hash


def test_a_page_hash_depends_on_every_token_before_it_and_on_the_salt() -> None:
    root = root_hash("model|float32")
    a = chain_hashes(root, [1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert len(a) == 2  # the partial last page has no hash
    assert chain_hashes(root, [1, 2, 3, 4, 5, 6, 7, 8], 4) == a
    b = chain_hashes(root, [0, 2, 3, 4, 5, 6, 7, 8], 4)  # same second page, different first
    assert b[0] != a[0] and b[1] != a[1]
    assert chain_hashes(root_hash("model|bfloat16"), [1, 2, 3, 4], 4)[0] != a[0]
    assert chain_hashes(a[0], [5, 6, 7, 8], 4) == a[1:]  # extending a chain page by page gives the same hashes


def test_the_index_serves_the_longest_cached_prefix_and_forgets_evicted_pages() -> None:
    pool = PageAllocator(2)
    index = PageIndex(pool)
    h = chain_hashes(root_hash(""), list(range(12)), 4)
    p0, p1 = pool.allocate(2)
    assert index.insert(h[0], p0, origin=7) and index.insert(h[1], p1, origin=8)
    assert not index.insert(h[1], p0, origin=9)  # a hash already cached keeps its page
    assert index.lookup(h) == [p0, p1] and index.lookup(h[1:]) == [p1]
    assert index.origin(p1) == 8 and index.holds(h[1], p1) and not index.holds(h[1], p0)
    pool.free([p0, p1])
    assert index.lookup(h) == [p0, p1]  # idle, still cached
    pool.allocate(1)  # evicts p0, the least recently used
    assert index.lookup(h) == [] and index.get(h[1]) == p1 and len(index) == 1 and index.origin(p0) == -1
