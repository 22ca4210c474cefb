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


def lowers_to_triton(fn, *args) -> bool:
    """Run the Pallas -> Triton lowering for CUDA without a GPU (export never compiles the kernel)."""
    triton_call = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    try:
        exported = jax.export.export(fn, platforms=["cuda"], disabled_checks=[triton_call])(*args)
    except RuntimeError as e:
        if "No supported GPU devices found" not in str(e):
            raise
        # jax >= 0.11 reads the compute capability from a real (or abstract) GPU before lowering.
        pytest.skip(f"this jax ({jax.__version__}) cannot lower Pallas to Triton without a GPU")
    return "__gpu$xla.gpu.triton" in exported.mlir_module()


def test_decode_lowers_to_triton_at_llama_shape() -> None:
    spec = jax.ShapeDtypeStruct
    q = spec((64, 32, 128), jnp.bfloat16)
    pages = spec((8, 4096, 16, 128), jnp.bfloat16)
    assert lowers_to_triton(paged_decode_attention, q, pages, pages, spec((64,), jnp.int32), spec((64, 128), jnp.int32))
