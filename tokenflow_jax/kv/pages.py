"""Page arithmetic shared by every tier: the null page, pages for a count (ceiling division), page ids as int32 arrays.

Page 0 of every pool is the null page: padding tokens write there and nothing valid reads it, so a pool of
`n` usable pages holds `n + 1` (`pool_pages`). Every count of pages a user or a policy sees is usable pages.
"""

from __future__ import annotations

import bisect
import os
from array import array
from collections.abc import Iterable, Sequence

NULL_PAGE = 0
# The host tier's default size: vLLM's default swap space per device, capped at a quarter of the host's memory.
HOST_TIER_BYTES = 4 << 30


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages that hold `num_tokens` tokens."""
    return -(-num_tokens // page_size)


def pool_pages(usable_pages: int) -> int:
    """Pages a pool allocates for `usable_pages` usable ones: the null page comes on top."""
    return usable_pages + 1


def transfer_pieces(num_pages: int, sizes: Sequence[int]) -> list[int]:
    """Transfer sizes (ascending `sizes`, 1 among them) that add up to exactly `num_pages`, largest first (its
    binary decomposition when `sizes` are powers of two): a copy moves only the pages asked for, in compiled sizes."""
    pieces = []
    while num_pages > 0:
        pieces.append(sizes[bisect.bisect_right(sizes, num_pages) - 1])
        num_pages -= pieces[-1]
    return pieces


def transfer_slices(num_pages: int, sizes: Sequence[int]) -> list[slice]:
    """`transfer_pieces` as consecutive slices of the `num_pages` pages, in order."""
    slices, start = [], 0
    for n in transfer_pieces(num_pages, sizes):
        slices.append(slice(start, start + n))
        start += n
    return slices


def page_ids(pages: Iterable[int] = ()) -> array:
    """Device page ids as a flat int32 array: every step lays out the pages of every sequence it computes, and
    arrays join into one buffer in C where lists of ints convert one by one (~70x slower at 16k pages)."""
    return array("i", pages)


def host_memory_bytes() -> int:
    """The host's physical memory in bytes (4x HOST_TIER_BYTES where the host does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX host: assume the default fits
        return 4 * HOST_TIER_BYTES


def default_host_pages(device_pages: int, page_bytes: int, host_bytes: int | None = None) -> int:
    """Usable host-tier pages when none are asked for: twice the device pool (SGLang HiCache's ratio), or as many as
    HOST_TIER_BYTES holds, whichever is more, and never more than a quarter of `host_bytes` (the host's memory) holds:
    twice a GPU's pool can be more than the host has (docs/DESIGN.md section 3.15). A paused stream keeps its KV
    there; a host tier too small for the streams a burst starts turns every further pause into a recompute."""
    cap = (host_memory_bytes() if host_bytes is None else host_bytes) // 4 // max(1, page_bytes)
    return min(max(2 * device_pages, HOST_TIER_BYTES // max(1, page_bytes)), cap)
