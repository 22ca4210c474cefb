"""Pallas paged decode attention vs the XLA reference, in interpret mode on CPU.

Interpret mode fills outputs with NaN before the kernel runs, so a row the kernel forgets to write shows up
as NaN; the tests check there is none and that length-0 rows are exactly zero.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import paged_decode_attention, paged_decode_attention_reference
from pallas_kernels.tiles import decode_tiles

TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def fresh_seed() -> int:
    """A fixed seed, so every run checks the same data; set PALLAS_TEST_SEED to try others."""
    return int(os.environ.get("PALLAS_TEST_SEED", 20261204))


def relative_error(out: jax.Array, ref: jax.Array) -> float:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def random_paged_cache(
    rng: np.random.Generator,
    kv_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    max_pages: int,
    dtype,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Random K/V pools and permuted block tables: distinct pages, never page 0; unused entries are 0."""
    pages_needed = [-(-n // page_size) for n in kv_lens]
    num_pages = 1 + sum(pages_needed) + 3  # a few pages nobody owns
    owners = rng.permutation(np.arange(1, num_pages))
    block_tables = np.zeros((len(kv_lens), max_pages), np.int32)
    start = 0
    for b, n in enumerate(pages_needed):
        block_tables[b, :n] = owners[start : start + n]
        start += n
    shape = (num_kv_heads, num_pages, page_size, head_dim)
    k_pages = jnp.asarray(rng.standard_normal(shape), dtype)
    v_pages = jnp.asarray(rng.standard_normal(shape), dtype)
    return k_pages, v_pages, jnp.asarray(block_tables)


class DecodeCase(NamedTuple):
    lengths: tuple[int, ...]  # one more random length is appended each run
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: type
    pages_per_block: int | None


# Each GQA ratio (1/4/8), page size, head_dim and dtype appears at least once; lengths hit 1, k*S, k*S+1, 0.
CASES = [
    DecodeCase((1, 16, 17, 0, 40), 4, 4, 64, 16, jnp.float32, None),
    DecodeCase((32, 33, 1, 70), 16, 4, 128, 32, jnp.bfloat16, 1),
    DecodeCase((0, 5, 48, 49, 100), 16, 2, 64, 16, jnp.bfloat16, 2),
    DecodeCase((64, 65, 1, 31), 8, 1, 128, 32, jnp.float32, 4),
]


@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: (
        f"g{c.num_q_heads // c.num_kv_heads}-"
        f"d{c.head_dim}-s{c.page_size}-{jnp.dtype(c.dtype).name}-ppb{c.pages_per_block}"
    ),
)
def test_decode_matches_reference(case: DecodeCase) -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    max_pages = 5
    lengths = [*case.lengths, int(rng.integers(1, max_pages * case.page_size + 1))]
    lengths = [min(n, max_pages * case.page_size) for n in lengths]
    k_pages, v_pages, block_tables = random_paged_cache(
        rng, lengths, case.num_kv_heads, case.head_dim, case.page_size, max_pages, case.dtype
    )
    q = jnp.asarray(rng.standard_normal((len(lengths), case.num_q_heads, case.head_dim)), case.dtype)
    lengths_arr = jnp.asarray(lengths, jnp.int32)

    out = paged_decode_attention(
        q, k_pages, v_pages, lengths_arr, block_tables, interpret=True, pages_per_block=case.pages_per_block
    )
    ref = paged_decode_attention_reference(q, k_pages, v_pages, lengths_arr, block_tables)

    note = f"seed={seed} lengths={lengths}"
    assert out.shape == ref.shape and out.dtype == ref.dtype, note
    assert not np.isnan(np.asarray(out, np.float32)).any(), note
    empty = np.asarray(lengths) == 0
    assert (np.asarray(out, np.float32)[empty] == 0).all(), note
    assert relative_error(out, ref) < TOLERANCE[case.dtype], f"{note} err={relative_error(out, ref)}"


def check_against_reference(q, k_pages, v_pages, lengths: list[int], block_tables, note: str, **tiles) -> None:
    lengths_arr = jnp.asarray(lengths, jnp.int32)
    out = paged_decode_attention(q, k_pages, v_pages, lengths_arr, block_tables, interpret=True, **tiles)
    ref = paged_decode_attention_reference(q, k_pages, v_pages, lengths_arr, block_tables)
    assert out.shape == ref.shape and out.dtype == ref.dtype, note
    out_np = np.asarray(out, np.float32)
    assert not np.isnan(out_np).any(), note
    assert (out_np[np.asarray(lengths) == 0] == 0).all(), note
    err = relative_error(out, ref)
    assert err < TOLERANCE[q.dtype.type], f"{note} err={err}"


@pytest.mark.parametrize("draw", range(6))
def test_split_decode_matches_reference_on_random_shapes(draw: int) -> None:
    """The context split across programs and merged by log-sum-exp, on random shapes; the first draws have
    the odd query groups (3, 5, 7) that are padded to a power of two inside the kernel."""
    seed = fresh_seed()
    rng = np.random.default_rng([seed, draw])
    group = (3, 5, 7)[draw] if draw < 3 else int(rng.integers(1, 9))
    num_kv_heads, head_dim, page_size = int(rng.choice([1, 2, 4])), int(rng.choice([32, 64])), int(rng.choice([8, 16]))
    max_pages, pages_per_block = int(rng.integers(4, 13)), int(rng.choice([1, 2]))
    num_splits = int(rng.integers(2, 6))
    dtype = (jnp.float32, jnp.bfloat16)[draw % 2]
    lengths = [0, max_pages * page_size, *rng.integers(1, max_pages * page_size + 1, int(rng.integers(1, 4)))]
    k_pages, v_pages, block_tables = random_paged_cache(
        rng, lengths, num_kv_heads, head_dim, page_size, max_pages, dtype
    )
    q = jnp.asarray(rng.standard_normal((len(lengths), group * num_kv_heads, head_dim)), dtype)
    note = f"seed={seed} draw={draw} group={group} kv_heads={num_kv_heads} splits={num_splits} lengths={lengths}"
    tiles = {"num_splits": num_splits, "pages_per_block": pages_per_block}
    check_against_reference(q, k_pages, v_pages, lengths, block_tables, note, **tiles)


def test_small_batch_long_context_splits_by_default() -> None:
    """The tile table splits one sequence's long context (the GPU would otherwise run Hkv programs)."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    num_kv_heads, page_size, max_pages = 2, 16, 64
    assert decode_tiles(1, num_kv_heads, max_pages, page_size).num_splits > 1
    lengths = [int(rng.integers(max_pages * page_size // 2, max_pages * page_size + 1))]
    k_pages, v_pages, block_tables = random_paged_cache(
        rng, lengths, num_kv_heads, 64, page_size, max_pages, jnp.float32
    )
    q = jnp.asarray(rng.standard_normal((1, 5 * num_kv_heads, 64)), jnp.float32)
    check_against_reference(q, k_pages, v_pages, lengths, block_tables, f"seed={seed} lengths={lengths}")


def test_decode_custom_scale() -> None:
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    lengths = [3, 20]
    k_pages, v_pages, block_tables = random_paged_cache(rng, lengths, 2, 64, 16, 2, jnp.float32)
    q = jnp.asarray(rng.standard_normal((2, 4, 64)), jnp.float32)
    lengths_arr = jnp.asarray(lengths, jnp.int32)
    out = paged_decode_attention(q, k_pages, v_pages, lengths_arr, block_tables, sm_scale=0.3, interpret=True)
    ref = paged_decode_attention_reference(q, k_pages, v_pages, lengths_arr, block_tables, sm_scale=0.3)
    assert relative_error(out, ref) < 1e-5, f"seed={seed}"
