"""Paged decode attention as a Pallas kernel (Triton lowering for NVIDIA GPUs, interpret mode on CPU).

One program per (sequence, kv head) computes all G = Hq/Hkv query heads of the group at once, so each
K/V page is read from HBM once per group. Pages are visited through the block table with a
flash-attention online softmax; the loop stops at ceil(length / block), so cost follows the real length.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Finite stand-in for -inf: keeps (masked - max) free of inf - inf = NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LOG2_E = math.log2(math.e)
# Triton's tensor-core dots need every dimension >= 16.
MIN_DOT_ROWS = 16


def triton_compiler_params(num_warps: int, num_stages: int) -> object:
    """Triton launch parameters under whichever name this jax version uses."""
    for name in ("CompilerParams", "TritonCompilerParams"):
        params_class = getattr(plgpu, name, None)
        if params_class is not None:
            return params_class(num_warps=num_warps, num_stages=num_stages)
    # Oldest form: a dict keyed by backend.
    return {"triton": {"num_warps": num_warps, "num_stages": num_stages}}


def default_sm_scale(head_dim: int, sm_scale: float | None) -> float:
    return float(head_dim) ** -0.5 if sm_scale is None else float(sm_scale)


def dot_rows(num_heads: int) -> int:
    """Rows fed to the dot for `num_heads` query heads: each head repeated up to at least 16 rows."""
    return num_heads * max(1, pl.cdiv(MIN_DOT_ROWS, num_heads))


def replicate_rows(x: jax.Array, rows: int) -> jax.Array:
    """[n, D] -> [rows, D], each row repeated rows/n times in place (Triton cannot pad by concatenation)."""
    n, d = x.shape
    if rows == n:
        return x
    return jnp.broadcast_to(x[:, None, :], (n, rows // n, d)).reshape(rows, d)


def collapse_rows(x: jax.Array, n: int) -> jax.Array:
    """Inverse of `replicate_rows`: the copies are identical, so max picks the value without slicing."""
    rows, d = x.shape
    if rows == n:
        return x
    return x.reshape(n, rows // n, d).max(axis=1)


def online_softmax_step(
    acc: jax.Array, m_prev: jax.Array, l_prev: jax.Array, logits: jax.Array, v: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One flash-attention update with base-2 logits [M, N] and values [N, D]."""
    m_next = jnp.maximum(m_prev, logits.max(axis=-1))
    correction = jnp.exp2(m_prev - m_next)
    probs = jnp.exp2(logits - m_next[:, None])
    l_next = correction * l_prev + probs.sum(axis=-1)
    acc = correction[:, None] * acc + plgpu.dot(probs.astype(v.dtype), v)
    return acc, m_next, l_next


def normalize(acc: jax.Array, l_sum: jax.Array) -> jax.Array:
    """acc / l, with rows that saw no key (l == 0, acc == 0) left at zero."""
    return acc / jnp.where(l_sum == 0.0, 1.0, l_sum)[:, None]


def gather_page_block(pages_ref, page_ids: jax.Array) -> jax.Array:
    """Pages `page_ids` [n] of one head's pool [P, S, D] as contiguous tokens [n * S, D]."""
    _, page_size, head_dim = pages_ref.shape
    return pages_ref[page_ids].reshape(page_ids.shape[0] * page_size, head_dim)


def pad_block_tables(block_tables: jax.Array, pages_per_block: int) -> jax.Array:
    """Pad tables with the null page so a block of pages never reads past the end of a row."""
    pad = -block_tables.shape[1] % pages_per_block
    return jnp.pad(block_tables, ((0, 0), (0, pad))) if pad else block_tables


def _decode_kernel(
    q_ref,
    k_pages_ref,
    v_pages_ref,
    length_ref,
    block_table_ref,
    o_ref,
    *,
    sm_scale: float,
    pages_per_block: int,
):
    # q_ref, o_ref [G, D]; k/v_pages_ref [P, S, D] (this kv head); length_ref [1]; block_table_ref [pages].
    group, head_dim = q_ref.shape
    rows = dot_rows(group)
    block_k = pages_per_block * k_pages_ref.shape[1]
    length = length_ref[0]
    q = replicate_rows(q_ref[...], rows)

    def attend_block(i, carry):
        acc, m_i, l_i = carry
        page_ids = block_table_ref[pl.ds(i * pages_per_block, pages_per_block)]
        k = gather_page_block(k_pages_ref, page_ids)
        v = gather_page_block(v_pages_ref, page_ids)
        logits = plgpu.dot(q, k, trans_b=True) * (sm_scale * LOG2_E)
        position = i * block_k + jnp.arange(block_k)
        logits = jnp.where((position < length)[None, :], logits, MASK_VALUE)
        return online_softmax_step(acc, m_i, l_i, logits, v)

    init = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    acc, _, l_i = lax.fori_loop(0, pl.cdiv(length, block_k), attend_block, init)
    o_ref[...] = collapse_rows(normalize(acc, l_i), group).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale", "interpret", "pages_per_block", "num_warps", "num_stages"))
def paged_decode_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    lengths: jax.Array,
    block_tables: jax.Array,
    *,
    sm_scale: float | None = None,
    interpret: bool = False,
    pages_per_block: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> jax.Array:
    """One new token per sequence attending to its first `lengths[b]` cached tokens. -> [B, Hq, D].

    q [B, Hq, D]; k_pages, v_pages [Hkv, P, S, D] (page 0 is the null page); lengths int32 [B], the current
    token's K/V already written; block_tables int32 [B, max_pages]. Rows with length 0 return zeros.
    `pages_per_block` pages are read per loop step (default: 128 tokens' worth).
    """
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"q heads {num_q_heads} must be a multiple of kv heads {num_kv_heads}")
    group = num_q_heads // num_kv_heads
    if pages_per_block is None:
        pages_per_block = max(1, 128 // page_size)
    block_tables = pad_block_tables(block_tables.astype(jnp.int32), pages_per_block)
    kernel = functools.partial(
        _decode_kernel, sm_scale=default_sm_scale(head_dim, sm_scale), pages_per_block=pages_per_block
    )
    pool_spec = pl.BlockSpec((None, num_pages, page_size, head_dim), lambda b, h: (h, 0, 0, 0))
    head_group_spec = pl.BlockSpec((None, group, head_dim), lambda b, h: (b, h, 0))
    return pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads),
        in_specs=[
            head_group_spec,
            pool_spec,
            pool_spec,
            pl.BlockSpec((1,), lambda b, h: (b,)),
            pl.BlockSpec((None, block_tables.shape[1]), lambda b, h: (b, 0)),
        ],
        out_specs=head_group_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=triton_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="paged_decode_attention",
    )(q, k_pages, v_pages, lengths.astype(jnp.int32), block_tables)
