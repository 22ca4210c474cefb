"""Host-side assembly of a ragged batch (numpy) into the model's AttentionMetadata layout."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


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


def build_ragged_batch(
    chunks: Sequence[SequenceChunk],
    page_size: int,
    *,
    pad_tokens: int | None = None,
    pad_seqs: int | None = None,
    pad_pages: int | None = None,
) -> RaggedBatch:
    """Lay out chunks back to back; padding tokens write to the null page 0 and padded sequences are empty."""
    num_tokens = sum(len(c.token_ids) for c in chunks)
    t_pad = pad_tokens or num_tokens
    b_pad = pad_seqs or len(chunks)
    p_pad = pad_pages or max((len(c.pages) for c in chunks), default=1)
    if t_pad < num_tokens or b_pad < len(chunks):
        raise ValueError(f"batch of {num_tokens} tokens / {len(chunks)} seqs exceeds padding {t_pad}/{b_pad}")
    tokens = np.zeros(t_pad, np.int32)
    positions = np.zeros(t_pad, np.int32)
    slots = np.arange(t_pad, dtype=np.int32) % page_size  # padding lands in page 0
    cu = np.full(b_pad + 1, num_tokens, np.int32)
    kv_lens = np.zeros(b_pad, np.int32)
    tables = np.zeros((b_pad, p_pad), np.int32)
    logits_idx = np.zeros(b_pad, np.int32)
    offset = 0
    for i, c in enumerate(chunks):
        n = len(c.token_ids)
        end = c.start + n
        needed = -(-end // page_size)
        if len(c.pages) < needed:
            raise ValueError(f"sequence {i} needs {needed} pages for {end} tokens, has {len(c.pages)}")
        if needed > p_pad:
            raise ValueError(f"sequence {i} needs {needed} pages, block tables padded to {p_pad}")
        pos = np.arange(c.start, end, dtype=np.int32)
        pages = np.asarray(c.pages, np.int32)
        tokens[offset : offset + n] = c.token_ids
        positions[offset : offset + n] = pos
        slots[offset : offset + n] = pages[pos // page_size] * page_size + pos % page_size
        cu[i] = offset
        kv_lens[i] = end
        tables[i, : min(len(pages), p_pad)] = pages[:p_pad]
        offset += n
        logits_idx[i] = offset - 1
    cu[len(chunks)] = offset
    return RaggedBatch(tokens, positions, slots, cu, kv_lens, tables, logits_idx, len(chunks), num_tokens)
