"""Pallas ragged paged prefill attention vs the XLA reference, in interpret mode on CPU.

Interpret mode fills outputs with NaN before the kernel runs, so an unwritten row shows up as NaN; the
tests check there is none and that padded rows past cu_q_lens[-1] are exactly zero.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import paged_prefill_attention, paged_prefill_attention_reference
from tests.pallas_kernels.test_decode import (
    TOLERANCE,
    fresh_seed,
    random_paged_cache,
    relative_error,
)


class PrefillCase(NamedTuple):
    q_lens: tuple[int, ...]
    cached: tuple[int, ...]  # tokens already in the cache before this chunk (0: first prefill)
    padding: int  # rows of q past cu_q_lens[-1]
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: type
    block_q: int | None
    pages_per_block: int | None


# Each GQA ratio (1/4/8, and odd 7/3), page size, head_dim and dtype appears at least once; kv_lens hit 1, k*S
# and k*S+1; chunked prefill (cached > 0), an empty sequence (q_len 0) and padded T are covered.
CASES = [
    PrefillCase((1, 16, 17, 9), (0, 0, 0, 23), 0, 4, 4, 64, 16, jnp.float32, None, None),
    PrefillCase((5, 0, 33, 3), (27, 4, 0, 61), 6, 16, 4, 128, 32, jnp.bfloat16, 4, 1),
    PrefillCase((40, 1, 12), (0, 31, 20), 3, 16, 2, 64, 16, jnp.bfloat16, 2, 2),
    PrefillCase((7, 64, 2), (57, 1, 0), 5, 8, 1, 128, 32, jnp.float32, None, 2),
    # Odd groups, loaded padded to a power of two with the extra heads masked.
    PrefillCase((5, 0, 33, 3), (27, 4, 0, 61), 6, 14, 2, 64, 16, jnp.float32, None, None),
    PrefillCase((40, 1, 12), (0, 31, 20), 3, 12, 4, 64, 16, jnp.bfloat16, 2, 2),
]


def _case_id(c: PrefillCase) -> str:
    ratio = c.num_q_heads // c.num_kv_heads
    tiles = f"bq{c.block_q}-ppb{c.pages_per_block}"
    return f"g{ratio}-d{c.head_dim}-s{c.page_size}-{jnp.dtype(c.dtype).name}-{tiles}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_prefill_matches_reference(case: PrefillCase) -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    kv_lens = [q + c for q, c in zip(case.q_lens, case.cached, strict=True)]
    max_pages = max(-(-n // case.page_size) for n in kv_lens) + 1  # a spare, unused table entry
    k_pages, v_pages, block_tables = random_paged_cache(
        rng, kv_lens, case.num_kv_heads, case.head_dim, case.page_size, max_pages, case.dtype
    )
    num_real = sum(case.q_lens)
    q = jnp.asarray(rng.standard_normal((num_real + case.padding, case.num_q_heads, case.head_dim)), case.dtype)
    cu_q_lens = jnp.asarray(np.concatenate([[0], np.cumsum(case.q_lens)]), jnp.int32)
    kv_lens_arr = jnp.asarray(kv_lens, jnp.int32)

    out = paged_prefill_attention(
        q,
        k_pages,
        v_pages,
        cu_q_lens,
        kv_lens_arr,
        block_tables,
        interpret=True,
        block_q=case.block_q,
        pages_per_block=case.pages_per_block,
    )
    ref = paged_prefill_attention_reference(q, k_pages, v_pages, cu_q_lens, kv_lens_arr, block_tables)

    note = f"seed={seed} kv_lens={kv_lens}"
    assert out.shape == ref.shape and out.dtype == ref.dtype, note
    out_np = np.asarray(out, np.float32)
    assert not np.isnan(out_np).any(), note
    assert (out_np[num_real:] == 0).all(), note
    assert relative_error(out, ref) < TOLERANCE[case.dtype], f"{note} err={relative_error(out, ref)}"
