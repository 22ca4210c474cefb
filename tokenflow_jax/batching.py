"""Host-side assembly of a ragged batch (numpy) into the model's AttentionMetadata layout."""

from __future__ import annotations

import dataclasses
import itertools
from array import array
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from tokenflow_jax.kv.pages import NULL_PAGE, pages_for

assert NULL_PAGE == 0, "block tables and padding slots start as zeros"


class SequenceChunk(NamedTuple):
    """New tokens of one sequence in a step: `token_ids` at positions `start .. start + len - 1`.

    (A named tuple: the executor builds one per sequence per step, ~4x faster than a frozen dataclass.)"""

    token_ids: Sequence[int]
    start: int
    pages: Sequence[int]


@dataclasses.dataclass(frozen=True)
class RaggedBatch:
    """numpy arrays for one model call, padded to (num_tokens, num_seqs, max_pages)."""

    tokens: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    slot_mapping: np.ndarray  # [T]
    cu_q_lens: np.ndarray  # [B+1]
    kv_lens: np.ndarray  # [B]
    block_tables: np.ndarray  # [B, max_pages]
    logits_indices: np.ndarray  # [B]: last new token of each sequence
    num_seqs: int  # real sequences (the rest is padding)
    num_tokens: int  # real tokens


def _flat_page_ids(pages: list[Sequence[int]], total: int) -> np.ndarray:
    """Every sequence's pages back to back. The engine's are int32 arrays (`request.page_ids`): one join in C."""
    if all(isinstance(p, array) and p.typecode == "i" for p in pages):
        return np.frombuffer(b"".join(pages), np.int32)
    return np.fromiter(itertools.chain.from_iterable(pages), np.int64, count=total)


def build_ragged_batch(
    chunks: Sequence[SequenceChunk],
    page_size: int,
    *,
    pad_tokens: int | None = None,
    pad_seqs: int | None = None,
    pad_pages: int | None = None,
) -> RaggedBatch:
    """Lay out chunks back to back; padding tokens write to the null page and padded sequences are empty.

    Whole-batch numpy rather than a loop of small array writes per sequence: at 256 decoding sequences the loop
    cost milliseconds of host time every step (BENCHMARKS.md, "Host batch assembly", has the figures)."""
    num_seqs = len(chunks)
    lens = np.fromiter(map(len, (c.token_ids for c in chunks)), np.int64, count=num_seqs)
    starts = np.fromiter((c.start for c in chunks), np.int64, count=num_seqs)
    page_counts = np.fromiter(map(len, (c.pages for c in chunks)), np.int64, count=num_seqs)
    num_tokens, most_pages = int(lens.sum()), int(page_counts.max()) if num_seqs else 0
    t_pad = pad_tokens or num_tokens
    b_pad = pad_seqs or num_seqs
    p_pad = pad_pages or (most_pages if num_seqs else 1)
    if t_pad < num_tokens or b_pad < num_seqs:
        raise ValueError(f"batch of {num_tokens} tokens / {num_seqs} seqs exceeds padding {t_pad}/{b_pad}")
    ends = starts + lens
    needed = pages_for(ends, page_size)
    bad = ((page_counts < needed) | (needed > p_pad)).nonzero()[0]
    if bad.size:  # the first offending sequence, as a loop over them would find it
        i = int(bad[0])
        if page_counts[i] < needed[i]:
            raise ValueError(f"sequence {i} needs {needed[i]} pages for {ends[i]} tokens, has {page_counts[i]}")
        raise ValueError(f"sequence {i} needs {needed[i]} pages, block tables padded to {p_pad}")
    # Block tables: every sequence's pages in one scatter into the flattened tables (a 1-D index: 2-D fancy
    # indexing with a mask cost ~8x as much at 16k pages).
    pages = [c.pages for c in chunks]
    if most_pages > p_pad:  # pages held beyond the padded width stay out of the table
        pages = [p[:p_pad] for p in pages]
        page_counts = np.minimum(page_counts, p_pad)
    page_offsets = np.zeros(num_seqs + 1, np.int64)
    np.cumsum(page_counts, out=page_offsets[1:])
    flat_pages = _flat_page_ids(pages, int(page_offsets[-1]))
    where = (np.arange(num_seqs) * p_pad - page_offsets[:-1]).repeat(page_counts)  # row start - first page
    where += np.arange(flat_pages.size)
    flat_tables = np.zeros(b_pad * p_pad, np.int32)  # zeros: NULL_PAGE
    flat_tables[where] = flat_pages
    tables = flat_tables.reshape(b_pad, p_pad)
    # Tokens back to back; each one's position and KV slot follow from its sequence's start and block table.
    offsets = np.zeros(num_seqs + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    seq_of = np.arange(num_seqs).repeat(lens)
    pos = np.arange(num_tokens) + (starts - offsets[:-1]).repeat(lens)
    tokens = np.zeros(t_pad, np.int32)
    tokens[:num_tokens] = np.fromiter(itertools.chain.from_iterable(c.token_ids for c in chunks), np.int64,
                                      count=num_tokens)  # fmt: skip
    positions = np.zeros(t_pad, np.int32)
    positions[:num_tokens] = pos
    slots = np.arange(t_pad, dtype=np.int32) % page_size  # padding lands in NULL_PAGE (0)
    slots[:num_tokens] = flat_tables[seq_of * p_pad + pos // page_size] * page_size + pos % page_size
    cu = np.full(b_pad + 1, num_tokens, np.int32)
    cu[:num_seqs] = offsets[:-1]
    kv_lens = np.zeros(b_pad, np.int32)
    kv_lens[:num_seqs] = ends
    logits_idx = np.zeros(b_pad, np.int32)
    logits_idx[:num_seqs] = offsets[1:] - 1
    return RaggedBatch(tokens, positions, slots, cu, kv_lens, tables, logits_idx, num_seqs, num_tokens)
