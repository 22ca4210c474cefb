"""Padded shape sets: every jitted call uses a shape from these, so all compile at start-up."""

from __future__ import annotations

import bisect
import dataclasses


class CompileDuringServing(RuntimeError):
    """A shape outside the precompiled buckets reached a jitted step after warm-up."""


def powers_of_two(low: int, high: int) -> tuple[int, ...]:
    """low, 2*low, ... up to and including `high` (which is appended if not a power-of-two multiple)."""
    out, x = [], low
    while x < high:
        out.append(x)
        x *= 2
    out.append(high)
    return tuple(out)


def round_up(sizes: tuple[int, ...], n: int, what: str) -> int:
    i = bisect.bisect_left(sizes, n)
    if i == len(sizes):
        raise CompileDuringServing(f"{what} {n} exceeds the largest bucket {sizes[-1]}")
    return sizes[i]


@dataclasses.dataclass(frozen=True)
class Buckets:
    seqs: tuple[int, ...]  # decode batch sizes
    tokens: tuple[int, ...]  # tokens per mixed (prefill-carrying) step
    pages: tuple[int, ...]  # block-table widths
    transfer_pages: tuple[int, ...]  # pages per swap / write-through transfer

    @classmethod
    def build(cls, max_num_seqs: int, max_batch_tokens: int, max_pages_per_seq: int) -> Buckets:
        # Smallest buckets are coarse on purpose: each bucket is a compilation (~1-2 s each on CPU).
        return cls(
            seqs=powers_of_two(min(4, max_num_seqs), max_num_seqs),
            tokens=powers_of_two(min(32, max_batch_tokens), max_batch_tokens),
            pages=powers_of_two(min(8, max_pages_per_seq), max_pages_per_seq),
            # Large transfers batch many pages into one copy (per-page copies are ~15x slower on a GPU).
            transfer_pages=powers_of_two(1, max(2 * max_pages_per_seq, 512)),
        )

    def seq_bucket(self, n: int) -> int:
        return round_up(self.seqs, n, "batch size")

    def token_bucket(self, n: int) -> int:
        return round_up(self.tokens, n, "batch tokens")

    def page_bucket(self, n: int) -> int:
        return round_up(self.pages, max(n, 1), "block-table width")

    def transfer_bucket(self, n: int) -> int:
        return round_up(self.transfer_pages, n, "transfer pages")
