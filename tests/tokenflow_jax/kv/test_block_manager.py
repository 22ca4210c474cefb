"""Two-tier page bookkeeping with the prefix cache: a cached prefix is mapped only when the pool has room for it."""

from __future__ import annotations

from tokenflow_jax.kv.block_manager import CachedPrefix, KVBlockManager
from tokenflow_jax.request import Request
from tokenflow_jax.sampling_params import SamplingParams


def request(rid: str, prompt: list[int]) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=4), rate=20.0, arrival=0.0)


def test_attaching_a_prefix_counts_its_idle_device_pages_against_the_room_for_host_loads() -> None:
    blocks = KVBlockManager(2, 8, 4, prefix_caching=True)
    first = request("a", list(range(13)))
    blocks.grow_device(first, 8)  # two full pages, computed and cached on both tiers
    first.num_computed = 8
    blocks.index_device(first)
    assert blocks.evict_tail(first) is not None
    blocks.free_device(first)  # both device pages idle, still cached
    blocks.host_index.insert(blocks.page_hashes(first, 12)[2], blocks.host.allocate(1)[0], origin=99)
    prefix = blocks.cached_prefix(request("b", list(range(13))))
    assert len(prefix.device_pages) == 2 and prefix.host_only == 1
    # Reviving the two idle pages leaves no free page for the third, loaded from the host: refused, nothing held.
    second = request("b", list(range(13)))
    assert blocks.attach(second, prefix, 1) is None
    assert blocks.device.num_used == 0 and blocks.device.num_idle == 2 and not second.device_pages
    copy = blocks.attach(second, CachedPrefix(prefix.device_pages, prefix.host_pages[:2]), 0)
    assert copy is not None and copy.src == [] and second.num_computed == 8
    assert list(second.device_pages) == prefix.device_pages and second.host_pages == prefix.host_pages[:2]
