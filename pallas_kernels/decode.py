"""Paged decode attention as a Pallas kernel (Triton lowering for NVIDIA GPUs, interpret mode on CPU).

One program per (sequence, kv head, context split) computes all G = Hq/Hkv query heads of the group at once,
so each K/V page is read from HBM once per group. Triton tiles need power-of-two sizes, so a group of 5 or 7
heads is loaded as 8 rows with the extra rows masked off, and never stored. Pages are visited through the
block table with a flash-attention online softmax; the loop stops at ceil(length / block), so cost follows
the real length. With more than one split (flash-decoding: small batch x long context would leave most of
the GPU idle), each split attends to its own share of the context and writes its partial output and
log-sum-exp; a small XLA merge combines them. Tile sizes and the split count come from `tiles` by shape.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.tiles import DecodeTiles, decode_tiles

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
    """Inverse of `replicate_rows` ([rows, ...] -> [n, ...]): the copies are identical, so max picks the value
    without slicing."""
    rows = x.shape[0]
    if rows == n:
        return x
    return x.reshape(n, rows // n, *x.shape[1:]).max(axis=1)


def padded_group(group: int) -> int:
    """Query heads per kv head rounded up to a power of two, the row count Triton can tile."""
    return 1 << (group - 1).bit_length()


def group_heads(kv_head: jax.Array, group: int) -> tuple[pl.Slice, jax.Array | None]:
    """The q-head rows of `kv_head`'s group, padded to a power of two, and which of them are real (None: all)."""
    padded = padded_group(group)
    in_group = None if padded == group else jnp.arange(padded) < group
    return pl.ds(kv_head * group, padded), in_group


def load_rows(ref, in_rows: jax.Array | None, axis: int) -> jax.Array:
    """ref[...] with the rows along `axis` that `in_rows` marks False read as zeros (never touched in memory)."""
    if in_rows is None:
        return ref[...]
    mask = jnp.expand_dims(in_rows, tuple(a for a in range(len(ref.shape)) if a != axis % len(ref.shape)))
    return plgpu.load(ref, mask=jnp.broadcast_to(mask, ref.shape), other=0)


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
    *out_refs,
    sm_scale: float,
    group: int,
    pages_per_block: int,
    blocks_per_split: int,
):
    # q_ref [Hq, D] (this sequence); k/v_pages_ref [P, S, D] (this kv head); length_ref [1]; block_table_ref
    # [pages]. out_refs: o_ref [Hq, D] with one split, else (o_ref [Gp, D] float32, lse_ref [Gp]) of this split.
    kv_head, split = pl.program_id(1), pl.program_id(2)
    head_dim = q_ref.shape[-1]
    padded = padded_group(group)
    rows = dot_rows(padded)
    block_k = pages_per_block * k_pages_ref.shape[1]
    length = length_ref[0]
    heads, in_group = group_heads(kv_head, group)
    q = replicate_rows(load_rows(q_ref.at[heads, :], in_group, axis=0), rows)

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
    # This split's blocks that hold a token: every visited block has at least one unmasked key.
    first = split * blocks_per_split
    end = jnp.maximum(first, jnp.minimum(pl.cdiv(length, block_k), first + blocks_per_split))
    acc, m_i, l_i = lax.fori_loop(first, end, attend_block, init)
    out = collapse_rows(normalize(acc, l_i), padded)
    if len(out_refs) == 1:
        (o_ref,) = out_refs
        out = out.astype(o_ref.dtype)
        if in_group is None:
            o_ref[heads, :] = out
        else:
            plgpu.store(o_ref.at[heads, :], out, mask=jnp.broadcast_to(in_group[:, None], out.shape))
    else:
        o_ref, lse_ref = out_refs
        o_ref[...] = out
        lse_ref[...] = collapse_rows(m_i + jnp.log2(l_i), padded)  # base 2; -inf where the split saw no key


def merge_splits(partial: jax.Array, lse: jax.Array) -> jax.Array:
    """Combine per-split outputs [..., splits, G, D] (each normalised over its split) with their base-2
    log-sum-exps [..., splits, G] into the attention over the whole context [..., G, D]; no key at all -> 0."""
    lse_max = lse.max(axis=-2, keepdims=True)
    seen = jnp.isfinite(lse)
    weight = jnp.where(seen, jnp.exp2(lse - jnp.where(seen, lse_max, 0.0)), 0.0)
    total = weight.sum(axis=-2)
    out = (weight[..., None] * partial).sum(axis=-3)
    return out / jnp.where(total == 0.0, 1.0, total)[..., None]


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "interpret", "pages_per_block", "num_splits", "num_warps", "num_stages"),
)
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
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> jax.Array:
    """One new token per sequence attending to its first `lengths[b]` cached tokens. -> [B, Hq, D].

    q [B, Hq, D]; k_pages, v_pages [Hkv, P, S, D] (page 0 is the null page); lengths int32 [B], the current
    token's K/V already written; block_tables int32 [B, max_pages]. Rows with length 0 return zeros.
    `pages_per_block` pages (a power of two) are read per loop step and the context is cut into `num_splits`
    parts (at most one per block); these and the Triton launch parameters default to the `tiles` table's entry
    for this shape.
    """
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"q heads {num_q_heads} must be a multiple of kv heads {num_kv_heads}")
    group = num_q_heads // num_kv_heads
    tiles = decode_tiles(batch, num_kv_heads, block_tables.shape[1], page_size)
    tiles = DecodeTiles(
        pages_per_block=pages_per_block or tiles.pages_per_block,
        num_splits=num_splits or tiles.num_splits,
        num_warps=num_warps or tiles.num_warps,
        num_stages=num_stages or tiles.num_stages,
    )
    if tiles.pages_per_block & (tiles.pages_per_block - 1):
        raise ValueError(f"pages_per_block must be a power of two (a Triton tile size), got {tiles.pages_per_block}")
    num_blocks = pl.cdiv(block_tables.shape[1], tiles.pages_per_block)
    splits = min(tiles.num_splits, num_blocks)
    blocks_per_split = pl.cdiv(num_blocks, splits)
    block_tables = pad_block_tables(block_tables.astype(jnp.int32), tiles.pages_per_block)
    kernel = functools.partial(
        _decode_kernel,
        sm_scale=default_sm_scale(head_dim, sm_scale),
        group=group,
        pages_per_block=tiles.pages_per_block,
        blocks_per_split=blocks_per_split,
    )
    padded = padded_group(group)
    if splits == 1:
        out_specs = pl.BlockSpec((None, num_q_heads, head_dim), lambda b, h, s: (b, 0, 0))
        out_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
    else:
        out_specs = [
            pl.BlockSpec((None, None, None, padded, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, padded), lambda b, h, s: (b, h, s, 0)),
        ]
        partial_shape = (batch, num_kv_heads, splits, padded)
        out_shape = [
            jax.ShapeDtypeStruct((*partial_shape, head_dim), jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
        ]
    pool_spec = pl.BlockSpec((None, num_pages, page_size, head_dim), lambda b, h, s: (h, 0, 0, 0))
    out = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, splits),
        in_specs=[
            pl.BlockSpec((None, num_q_heads, head_dim), lambda b, h, s: (b, 0, 0)),
            pool_spec,
            pool_spec,
            pl.BlockSpec((1,), lambda b, h, s: (b,)),
            pl.BlockSpec((None, block_tables.shape[1]), lambda b, h, s: (b, 0)),
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=triton_compiler_params(tiles.num_warps, tiles.num_stages),
        interpret=interpret,
        name="paged_decode_attention",
    )(q, k_pages, v_pages, lengths.astype(jnp.int32), block_tables)
    if splits == 1:
        return out
    merged = merge_splits(*out)[:, :, :group]  # [B, Hkv, G, D]
    return merged.reshape(q.shape).astype(q.dtype)
