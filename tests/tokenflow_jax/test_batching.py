"""`build_ragged_batch` (whole-batch numpy) against the layout written out token by token in plain Python."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenflow_jax.batching import SequenceChunk, build_ragged_batch
from tokenflow_jax.kv.pages import page_ids


def reference_layout(chunks: list[SequenceChunk], page_size: int, pad_tokens: int, pad_seqs: int,
                     pad_pages: int) -> dict[str, list]:  # fmt: skip
    tokens, positions, slots = [], [], []
    cu, kv_lens, tables, logits = [], [], [], []
    for c in chunks:
        cu.append(len(tokens))
        for j, token in enumerate(c.token_ids):
            pos = c.start + j
            tokens.append(token)
            positions.append(pos)
            slots.append(c.pages[pos // page_size] * page_size + pos % page_size)
        kv_lens.append(c.start + len(c.token_ids))
        logits.append(len(tokens) - 1)
        row = list(c.pages[:pad_pages])
        tables.append(row + [0] * (pad_pages - len(row)))
    real = len(tokens)
    return {
        "tokens": tokens + [0] * (pad_tokens - real),
        "positions": positions + [0] * (pad_tokens - real),
        "slot_mapping": slots + [t % page_size for t in range(real, pad_tokens)],  # padding: the null page
        "cu_q_lens": cu + [real] * (pad_seqs + 1 - len(chunks)),
        "kv_lens": kv_lens + [0] * (pad_seqs - len(chunks)),
        "block_tables": tables + [[0] * pad_pages] * (pad_seqs - len(chunks)),
        "logits_indices": logits + [0] * (pad_seqs - len(chunks)),
    }


@st.composite
def batches(draw: st.DrawFn) -> tuple[list[SequenceChunk], int]:
    page_size = draw(st.sampled_from([1, 4, 16]))
    # The engine's page lists are int32 arrays (joined in one go); lists and a mix take the general path.
    as_arrays = draw(st.sampled_from(["all", "none", "some"]))
    chunks = []
    for _ in range(draw(st.integers(0, 6))):
        start = draw(st.integers(0, 70))
        n = draw(st.integers(1, 40))
        # Sometimes more pages than the chunk needs (a request may hold pages ahead of its tokens).
        num_pages = -(-(start + n) // page_size) + draw(st.integers(0, 2))
        pages = draw(st.lists(st.integers(1, 10_000), min_size=num_pages, max_size=num_pages, unique=True))
        if as_arrays == "all" or (as_arrays == "some" and draw(st.booleans())):
            pages = page_ids(pages)
        chunks.append(SequenceChunk(draw(st.lists(st.integers(-1, 50_000), min_size=n, max_size=n)), start, pages))
    return chunks, page_size


@settings(max_examples=150, deadline=None)
@given(batch=batches(), extra_tokens=st.integers(0, 5), extra_seqs=st.integers(0, 3), extra_pages=st.integers(0, 3))
def test_layout_matches_the_token_by_token_reference(batch, extra_tokens, extra_seqs, extra_pages) -> None:
    chunks, page_size = batch
    pad_tokens = sum(len(c.token_ids) for c in chunks) + extra_tokens
    pad_seqs = len(chunks) + extra_seqs
    pad_pages = max([-(-(c.start + len(c.token_ids)) // page_size) for c in chunks], default=1) + extra_pages
    if not pad_tokens or not pad_seqs:
        return  # 0 means "no padding" to the builder
    got = build_ragged_batch(chunks, page_size, pad_tokens=pad_tokens, pad_seqs=pad_seqs, pad_pages=pad_pages)
    for field, expected in reference_layout(chunks, page_size, pad_tokens, pad_seqs, pad_pages).items():
        array = getattr(got, field)
        assert array.dtype == np.int32, field
        np.testing.assert_array_equal(array, np.array(expected, np.int32).reshape(array.shape), err_msg=field)
    assert (got.num_seqs, got.num_tokens) == (len(chunks), sum(len(c.token_ids) for c in chunks))


def test_refuses_a_chunk_without_the_pages_its_tokens_need() -> None:
    ok = SequenceChunk([5, 6], 0, [3])
    short = SequenceChunk([7], 16, [4])  # position 16 lives in a second page it does not have
    with pytest.raises(ValueError, match="sequence 1 needs 2 pages for 17 tokens, has 1"):
        build_ragged_batch([ok, short], 16)


def test_refuses_block_tables_narrower_than_a_chunk_needs() -> None:
    with pytest.raises(ValueError, match="sequence 0 needs 2 pages, block tables padded to 1"):
        build_ragged_batch([SequenceChunk([1], 20, [1, 2])], 16, pad_pages=1)


def test_refuses_padding_smaller_than_the_batch() -> None:
    with pytest.raises(ValueError, match="exceeds padding"):
        build_ragged_batch([SequenceChunk([1, 2, 3], 0, [1])], 16, pad_tokens=2)
