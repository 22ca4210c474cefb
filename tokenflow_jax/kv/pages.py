"""Page arithmetic shared by every tier: the null page, pages for a count (ceiling division), page ids as int32 arrays.

Page 0 of every pool is the null page: padding tokens write there and nothing valid reads it, so a pool of
`n` usable pages holds `n + 1` (`pool_pages`). Every count of pages a user or a policy sees is usable pages.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

NULL_PAGE = 0


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages that hold `num_tokens` tokens."""
    return -(-num_tokens // page_size)


def pool_pages(usable_pages: int) -> int:
    """Pages a pool allocates for `usable_pages` usable ones: the null page comes on top."""
    return usable_pages + 1


def page_ids(pages: Iterable[int] = ()) -> array:
    """Device page ids as a flat int32 array: every step lays out the pages of every sequence it computes, and
    arrays join into one buffer in C where lists of ints convert one by one (~70x slower at 16k pages)."""
    return array("i", pages)
