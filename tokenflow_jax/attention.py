"""Paged attention in plain XLA for the engine's CPU path (`attention="xla"`): same results as the references in
`pallas_kernels.reference`, without materialising every token's whole padded context.

The references gather each token's full block table into one tensor (`[tokens, Hkv, max_pages * S, D]`): a
prompt chunk of 256 tokens copies its sequence's pages 256 times, and a decode batch reads the padding up to
its page bucket. Here the new tokens attend to each other densely from their own K/V (no page reads at all for a
fresh prompt), and to the cached context a few pages at a time, only as far as the longest cached context in
the batch goes, folding each chunk into a running softmax. Chunks stay in cache instead of round-tripping memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.reference import token_sequence_ids

CHUNK_TOKENS = 64  # cached context read per loop iteration (whole pages)


def _take_pages(pages: jax.Array, ids: jax.Array) -> jax.Array:
    """[Hkv, P, S, D] pages and [T, n] page ids -> [Hkv, T, n * S, D] (whole pages: one contiguous copy each)."""
    hkv, _, page_size, head_dim = pages.shape
    t, n = ids.shape
    rows = jnp.take(pages.reshape(hkv, -1, page_size * head_dim), ids.reshape(-1), axis=1)
    return rows.reshape(hkv, t, n * page_size, head_dim)


def _fold(carry: tuple, scores: jax.Array, valid: jax.Array, values: jax.Array, spec: str) -> tuple:
    """Online softmax: fold `scores` [T, Hkv, G, C] (masked by `valid`) and their `values` into (max, sum, acc)."""
    peak, total, acc = carry
    scores = jnp.where(valid, scores, -jnp.inf)
    new_peak = jnp.maximum(peak, scores.max(-1))
    shift = jnp.where(jnp.isfinite(new_peak), new_peak, 0.0)  # a row with nothing valid yet keeps zeros
    p = jnp.where(valid, jnp.exp(scores - shift[..., None]), 0.0)
    rescale = jnp.exp(jnp.where(jnp.isfinite(peak), peak - shift, -jnp.inf))
    return new_peak, total * rescale + p.sum(-1), acc * rescale[..., None] + jnp.einsum(spec, p, values)


def paged_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    cu_q_lens: jax.Array,
    kv_lens: jax.Array,
    block_tables: jax.Array,
    *,
    decode: bool = False,
    sm_scale: float | None = None,
) -> jax.Array:
    """Ragged causal attention of new tokens q [T, Hq, D] (their K/V `k`, `v` [T, Hkv, D], already written to
    the pages) over each sequence's `kv_lens[b]` tokens. `decode`: one token per sequence (T == B).
    Padding rows return zeros. -> [T, Hq, D]."""
    t_total, hq, d = q.shape
    hkv, _, page_size, _ = k_pages.shape
    scale = float(d) ** -0.5 if sm_scale is None else float(sm_scale)
    if decode:
        seq = jnp.arange(t_total, dtype=jnp.int32)
        real = kv_lens > 0
    else:
        seq, real = token_sequence_ids(cu_q_lens, t_total)
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    cached = kv_lens - q_lens  # context written by earlier steps, per sequence
    index = jnp.arange(t_total, dtype=jnp.int32)
    qg = q.astype(jnp.float32).reshape(t_total, hkv, hq // hkv, d)
    # The pages hold K/V in the cache's dtype: attend to the same rounded values the references read back.
    k_new = k.astype(k_pages.dtype).astype(jnp.float32)
    v_new = v.astype(v_pages.dtype).astype(jnp.float32)

    # New tokens among themselves: same sequence, causal (T x T, small next to any sequence's context).
    if decode:
        scores = jnp.einsum("thgd,thd->thg", qg, k_new)[..., None] * scale
        valid = real[:, None, None, None]
        carry = _fold(_empty(t_total, hkv, hq // hkv, d), scores, valid, v_new[:, :, None, :], "thgc,thcd->thgd")
    else:
        scores = jnp.einsum("thgd,uhd->thgu", qg, k_new) * scale
        valid = (seq[:, None] == seq[None, :]) & (index[None, :] <= index[:, None]) & real[:, None]
        carry = _fold(_empty(t_total, hkv, hq // hkv, d), scores, valid[:, None, None, :], v_new, "thgu,uhd->thgd")

    # Cached context, a chunk of pages at a time, as far as the longest cached context in the batch.
    chunk = max(1, CHUNK_TOKENS // page_size)
    width = block_tables.shape[1]
    chunk = min(chunk, width)
    tables = jnp.pad(block_tables, ((0, 0), (0, -width % chunk)))  # every chunk a full slice
    token_cached = jnp.where(real, cached[seq], 0)
    span = chunk * page_size

    def body(i: jax.Array, carry: tuple) -> tuple:
        ids = jax.lax.dynamic_slice_in_dim(tables, i * chunk, chunk, axis=1)[seq]  # [T, chunk]
        keys, values = _take_pages(k_pages, ids), _take_pages(v_pages, ids)
        scores = jnp.einsum("thgd,htcd->thgc", qg, keys.astype(jnp.float32)) * scale
        valid = (i * span + jnp.arange(span))[None, :] < token_cached[:, None]
        return _fold(carry, scores, valid[:, None, None, :], values.astype(jnp.float32), "thgc,htcd->thgd")

    steps = (jnp.max(token_cached) + span - 1) // span
    _, total, acc = jax.lax.fori_loop(0, steps, body, carry)
    out = acc / jnp.where(total > 0, total, 1.0)[..., None]
    return out.reshape(t_total, hq, d).astype(q.dtype)


def _empty(t: int, hkv: int, group: int, d: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    return jnp.full((t, hkv, group), -jnp.inf), jnp.zeros((t, hkv, group)), jnp.zeros((t, hkv, group, d))
