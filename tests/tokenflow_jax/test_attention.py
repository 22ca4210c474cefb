"""The engine's XLA paged attention (`attention="xla"`) vs the XLA references in `pallas_kernels.reference`.

The new tokens' K/V handed to `paged_attention` are read back from the random pages at their own positions, as
the model writes them before attending."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.reference import paged_decode_attention_reference, paged_prefill_attention_reference
from tests.pallas_kernels.test_decode import TOLERANCE, random_paged_cache, relative_error
from tokenflow_jax.attention import paged_attention

jit_attention = jax.jit(paged_attention, static_argnames=("decode",))


class Case(NamedTuple):
    q_lens: tuple[int, ...]
    cached: tuple[int, ...]  # tokens in the cache before this step
    padding: int  # rows of q past cu_q_lens[-1]
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    spare_pages: int  # block-table entries past the longest sequence (the page bucket's padding)
    dtype: type


# Fresh prompts, chunked prefill over cached pages, decode rows beside a prompt chunk, an empty sequence,
# padded rows, contexts of exactly k pages and k pages + 1, block tables wider than a chunk of pages.
PREFILL = [
    Case((7, 16, 1), (0, 0, 0), 0, 4, 2, 32, 4, 1, jnp.float32),
    Case((5, 0, 33, 1, 1), (27, 4, 0, 64, 95), 6, 8, 2, 16, 16, 3, jnp.float32),
    Case((40, 1, 12), (0, 31, 20), 3, 4, 4, 32, 4, 9, jnp.float32),
    Case((3, 9), (130, 0), 2, 8, 1, 64, 16, 2, jnp.bfloat16),
]


def _inputs(case: Case, seed: int):
    rng = np.random.default_rng(seed)
    kv_lens = [q + c for q, c in zip(case.q_lens, case.cached, strict=True)]
    max_pages = max(-(-n // case.page_size) for n in kv_lens) + case.spare_pages
    k_pages, v_pages, tables = random_paged_cache(
        rng, kv_lens, case.num_kv_heads, case.head_dim, case.page_size, max_pages, case.dtype
    )
    num_real = sum(case.q_lens)
    q = jnp.asarray(rng.standard_normal((num_real + case.padding, case.num_q_heads, case.head_dim)), case.dtype)
    # Each new token's K/V: its own slot in the pages (padding rows: anything, they attend to nothing).
    k_new = np.asarray(rng.standard_normal((num_real + case.padding, case.num_kv_heads, case.head_dim)), np.float32)
    v_new = k_new.copy()
    row, pages_np, kp, vp = 0, np.asarray(tables), np.asarray(k_pages, np.float32), np.asarray(v_pages, np.float32)
    for b, (n, c) in enumerate(zip(case.q_lens, case.cached, strict=True)):
        for pos in range(c, c + n):
            page, offset = pages_np[b, pos // case.page_size], pos % case.page_size
            k_new[row], v_new[row] = kp[:, page, offset], vp[:, page, offset]
            row += 1
    cu_q_lens = jnp.asarray(np.concatenate([[0], np.cumsum(case.q_lens)]), jnp.int32)
    return q, jnp.asarray(k_new, case.dtype), jnp.asarray(v_new, case.dtype), k_pages, v_pages, cu_q_lens, \
        jnp.asarray(kv_lens, jnp.int32), tables  # fmt: skip


@pytest.mark.parametrize("case", PREFILL, ids=lambda c: f"q{sum(c.q_lens)}-s{c.page_size}-{jnp.dtype(c.dtype).name}")
def test_ragged_steps_match_reference(case: Case) -> None:
    q, k, v, k_pages, v_pages, cu_q_lens, kv_lens, tables = _inputs(case, seed=20261205)
    out = jit_attention(q, k, v, k_pages, v_pages, cu_q_lens, kv_lens, tables)
    ref = paged_prefill_attention_reference(q, k_pages, v_pages, cu_q_lens, kv_lens, tables)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert (np.asarray(out, np.float32)[sum(case.q_lens) :] == 0).all()  # padded rows
    assert relative_error(out, ref) < TOLERANCE[case.dtype], relative_error(out, ref)


@pytest.mark.parametrize("page_size", [4, 16])
def test_decode_batch_matches_reference(page_size: int) -> None:
    # One token per sequence; the last two rows are padding (kv_len 0), as a decode bucket pads them.
    cached = (0, 3, page_size - 1, page_size, 5 * page_size, 9 * page_size + 2, 0, 0)
    case = Case((1,) * 6 + (0, 0), cached, 0, 4, 2, 32, page_size, 2, jnp.float32)
    q, k, v, k_pages, v_pages, cu_q_lens, kv_lens, tables = _inputs(case, seed=7)
    q = jnp.concatenate([q, jnp.ones((2,) + q.shape[1:], q.dtype)])  # the padded rows' queries
    k = jnp.concatenate([k, jnp.ones((2,) + k.shape[1:], k.dtype)])
    v = jnp.concatenate([v, jnp.ones((2,) + v.shape[1:], v.dtype)])
    cu_q_lens = jnp.asarray([0, 1, 2, 3, 4, 5, 6, 6, 6], jnp.int32)
    out = jit_attention(q, k, v, k_pages, v_pages, cu_q_lens, kv_lens, tables, decode=True)
    ref = paged_decode_attention_reference(q, k_pages, v_pages, kv_lens, tables)
    assert (np.asarray(out)[6:] == 0).all()
    assert relative_error(out, ref) < TOLERANCE[jnp.float32], relative_error(out, ref)
