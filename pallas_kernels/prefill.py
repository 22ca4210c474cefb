"""Ragged paged prefill attention as a Pallas kernel (Triton lowering for NVIDIA GPUs, interpret on CPU).

The new tokens of all sequences sit back to back in q [T, Hq, D]. Each sequence is cut into query blocks
of `block_q` tokens; one program per (query block, kv head) attends its block's tokens x G query heads
(stacked as block_q * G dot rows, so K/V pages are read once per group) to the sequence's paged KV. Triton
tiles need power-of-two sizes, so a group of 5 or 7 heads is loaded as 8 with the extra rows masked off and
never stored. Tile sizes come from `tiles` by shape.
Pages wholly before the block's first position need no mask; pages after its last position are skipped.
First prefill, chunked prefill and recompute are the same call: token i of a sequence with q_len new
tokens sits at position kv_len - q_len + i.

Which block each program owns is a small table built with XLA before the kernel (no in-kernel search);
programs left over after the real blocks zero the padded rows past cu_q_lens[-1].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.decode import (
    LOG2_E,
    MASK_VALUE,
    MIN_DOT_ROWS,
    default_sm_scale,
    gather_page_block,
    group_heads,
    load_rows,
    normalize,
    online_softmax_step,
    pad_block_tables,
    padded_group,
    triton_compiler_params,
)
from pallas_kernels.tiles import prefill_tiles

# Schedule columns: which sequence, which rows [row_start, row_end) of q, and position = row + offset.
SEQ, ROW_START, ROW_END, POSITION_OFFSET = range(4)


def block_schedule(
    cu_q_lens: jax.Array, kv_lens: jax.Array, num_tokens: int, block_q: int, num_programs: int
) -> jax.Array:
    """int32 [num_programs, 4]: (seq, row_start, row_end, position_offset) for each query-block program.

    Real blocks come first; each leftover program owns the next `block_q` padded rows past cu_q_lens[-1]
    with a position offset so negative that it attends to nothing and writes zeros.
    """
    num_seqs = kv_lens.shape[0]
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    cu_blocks = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(pl.cdiv(q_lens, block_q))])
    program = jnp.arange(num_programs, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(cu_blocks[1:], program, side="right"), num_seqs - 1)
    seq = seq.astype(jnp.int32)
    is_real = program < cu_blocks[-1]

    real_start = cu_q_lens[seq] + (program - cu_blocks[seq]) * block_q
    real_end = jnp.minimum(real_start + block_q, cu_q_lens[seq + 1])
    real_offset = kv_lens[seq] - q_lens[seq] - cu_q_lens[seq]
    pad_start = cu_q_lens[-1] + (program - cu_blocks[-1]) * block_q
    pad_end = jnp.minimum(pad_start + block_q, num_tokens)
    pad_offset = jnp.full_like(program, -(num_tokens + block_q))

    return jnp.stack(
        [
            jnp.where(is_real, seq, 0),
            jnp.where(is_real, real_start, pad_start),
            jnp.where(is_real, real_end, pad_end),
            jnp.where(is_real, real_offset, pad_offset),
        ],
        axis=1,
    ).astype(jnp.int32)


def _prefill_kernel(
    schedule_ref,
    q_ref,
    k_pages_ref,
    v_pages_ref,
    block_tables_ref,
    o_ref,
    *,
    sm_scale: float,
    group: int,
    block_q: int,
    pages_per_block: int,
):
    # schedule_ref [4]; q_ref, o_ref [T, Hq, D]; k/v_pages_ref [P, S, D] (this kv head); block_tables_ref
    # [B, pages].
    num_tokens, _, head_dim = q_ref.shape
    padded = padded_group(group)
    rows = block_q * padded
    block_k = pages_per_block * k_pages_ref.shape[1]
    seq = schedule_ref[SEQ]
    row_start, row_end = schedule_ref[ROW_START], schedule_ref[ROW_END]
    position_offset = schedule_ref[POSITION_OFFSET]

    # A block that would run past T is shifted back; rows outside [row_start, row_end) are never stored.
    load_start = jnp.minimum(row_start, num_tokens - block_q)
    token = load_start + jnp.arange(rows, dtype=jnp.int32) // padded
    position = token + position_offset
    heads, in_group = group_heads(pl.program_id(1), group)
    q_block = q_ref.at[pl.ds(load_start, block_q), heads, :]
    q = load_rows(q_block, in_group, axis=1).reshape(rows, head_dim)

    def attend_block(kb, carry, *, causal: bool):
        acc, m_i, l_i = carry
        page_ids = block_tables_ref[seq, pl.ds(kb * pages_per_block, pages_per_block)]
        k = gather_page_block(k_pages_ref, page_ids)
        v = gather_page_block(v_pages_ref, page_ids)
        logits = plgpu.dot(q, k, trans_b=True) * (sm_scale * LOG2_E)
        if causal:
            key_position = kb * block_k + jnp.arange(block_k, dtype=jnp.int32)
            logits = jnp.where(key_position[None, :] <= position[:, None], logits, MASK_VALUE)
        return online_softmax_step(acc, m_i, l_i, logits, v)

    first_position = row_start + position_offset
    end_position = row_end + position_offset  # one past the last attended key
    unmasked_blocks = jnp.maximum(first_position + 1, 0) // block_k
    total_blocks = pl.cdiv(jnp.maximum(end_position, 0), block_k)
    carry = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    carry = lax.fori_loop(0, unmasked_blocks, functools.partial(attend_block, causal=False), carry)
    carry = lax.fori_loop(unmasked_blocks, total_blocks, functools.partial(attend_block, causal=True), carry)
    acc, _, l_i = carry

    out = normalize(acc, l_i).reshape(block_q, padded, head_dim).astype(o_ref.dtype)
    row = load_start + jnp.arange(block_q, dtype=jnp.int32)
    owned = (row >= row_start) & (row < row_end)
    mask = owned[:, None, None] if in_group is None else owned[:, None, None] & in_group[None, :, None]
    plgpu.store(o_ref.at[pl.ds(load_start, block_q), heads, :], out, mask=jnp.broadcast_to(mask, out.shape))


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "interpret", "block_q", "pages_per_block", "num_warps", "num_stages"),
)
def paged_prefill_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    cu_q_lens: jax.Array,
    kv_lens: jax.Array,
    block_tables: jax.Array,
    *,
    sm_scale: float | None = None,
    interpret: bool = False,
    block_q: int | None = None,
    pages_per_block: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> jax.Array:
    """Ragged causal attention of new tokens over paged KV. -> [T, Hq, D].

    q [T, Hq, D] holds the new tokens of all sequences back to back; cu_q_lens int32 [B+1]; kv_lens int32
    [B] counts cached tokens including the new ones (already written to the pages); block_tables int32
    [B, max_pages]. Rows past cu_q_lens[-1] are padding and return zeros. `block_q` query tokens and
    `pages_per_block` pages (powers of two) make one tile; they and the Triton launch parameters default to the
    `tiles` table's entry for this shape.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, num_pages, page_size, _ = k_pages.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"q heads {num_q_heads} must be a multiple of kv heads {num_kv_heads}")
    group = num_q_heads // num_kv_heads
    padded = padded_group(group)
    tiles = prefill_tiles(num_tokens, page_size)
    block_q = max(block_q or tiles.block_rows // padded, pl.cdiv(MIN_DOT_ROWS, padded))
    pages_per_block = pages_per_block or tiles.pages_per_block
    for name, value in (("block_q", block_q), ("pages_per_block", pages_per_block)):
        if value & (value - 1):
            raise ValueError(f"{name} must be a power of two (a Triton tile size), got {value}")
    block_tables = pad_block_tables(block_tables.astype(jnp.int32), pages_per_block)

    # The shifted-back last block needs T >= block_q; tiny batches are padded up to one block.
    padded_tokens = max(num_tokens, block_q)
    if padded_tokens > num_tokens:
        q = jnp.pad(q, ((0, padded_tokens - num_tokens), (0, 0), (0, 0)))
    num_programs = pl.cdiv(padded_tokens, block_q) + kv_lens.shape[0]
    schedule = block_schedule(
        cu_q_lens.astype(jnp.int32), kv_lens.astype(jnp.int32), padded_tokens, block_q, num_programs
    )

    kernel = functools.partial(
        _prefill_kernel,
        sm_scale=default_sm_scale(head_dim, sm_scale),
        group=group,
        block_q=block_q,
        pages_per_block=pages_per_block,
    )
    pool_spec = pl.BlockSpec((None, num_pages, page_size, head_dim), lambda p, h: (h, 0, 0, 0))
    tokens_spec = pl.BlockSpec((padded_tokens, num_q_heads, head_dim), lambda p, h: (0, 0, 0))
    out = pl.pallas_call(
        kernel,
        grid=(num_programs, num_kv_heads),
        in_specs=[
            pl.BlockSpec((None, 4), lambda p, h: (p, 0)),
            tokens_spec,
            pool_spec,
            pool_spec,
            pl.BlockSpec(block_tables.shape, lambda p, h: (0, 0)),
        ],
        out_specs=tokens_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=triton_compiler_params(num_warps or tiles.num_warps, num_stages or tiles.num_stages),
        interpret=interpret,
        name="paged_prefill_attention",
    )(schedule, q, k_pages, v_pages, block_tables)
    return out[:num_tokens]
