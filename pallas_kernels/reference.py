"""Plain-XLA paged attention and KV page writes: the references the Pallas kernels are checked against.

Page layout (per layer): k_pages, v_pages `[num_kv_heads, num_pages, page_size, head_dim]`.
Page 0 is the null page: padding tokens write there and nothing valid ever reads it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _default_scale(head_dim: int, sm_scale: float | None) -> float:
    return float(head_dim) ** -0.5 if sm_scale is None else float(sm_scale)


def gather_sequence_kv(pages: jax.Array, block_tables: jax.Array) -> jax.Array:
    """[Hkv, P, S, D] pages and [B, max_pages] tables -> [B, Hkv, max_pages * S, D] contiguous KV."""
    hkv, _, page_size, head_dim = pages.shape
    b, max_pages = block_tables.shape
    gathered = pages[:, block_tables]  # [Hkv, B, max_pages, S, D]
    return gathered.reshape(hkv, b, max_pages * page_size, head_dim).transpose(1, 0, 2, 3)


def paged_decode_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    lengths: jax.Array,
    block_tables: jax.Array,
    *,
    sm_scale: float | None = None,
) -> jax.Array:
    """One query token per sequence attending to its first `lengths[b]` cached tokens. -> [B, Hq, D]."""
    b, hq, d = q.shape
    hkv = k_pages.shape[0]
    scale = _default_scale(d, sm_scale)
    k = gather_sequence_kv(k_pages, block_tables).astype(jnp.float32)  # [B, Hkv, C, D]
    v = gather_sequence_kv(v_pages, block_tables).astype(jnp.float32)
    qg = q.astype(jnp.float32).reshape(b, hkv, hq // hkv, d)
    scores = jnp.einsum("bhgd,bhcd->bhgc", qg, k) * scale
    valid = jnp.arange(k.shape[2])[None, :] < lengths[:, None]  # [B, C]
    scores = jnp.where(valid[:, None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(jnp.where(lengths[:, None, None, None] > 0, scores, 0.0), axis=-1)
    probs = jnp.where(valid[:, None, None, :], probs, 0.0)
    out = jnp.einsum("bhgc,bhcd->bhgd", probs, v).reshape(b, hq, d)
    return out.astype(q.dtype)


def token_sequence_ids(cu_q_lens: jax.Array, num_tokens: int) -> tuple[jax.Array, jax.Array]:
    """For each of `num_tokens` rows of a ragged batch: (sequence index, whether the row is real)."""
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(cu_q_lens[1:], t, side="right").astype(jnp.int32)
    num_seqs = cu_q_lens.shape[0] - 1
    real = t < cu_q_lens[-1]
    return jnp.minimum(seq, num_seqs - 1), real


def paged_prefill_attention_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    cu_q_lens: jax.Array,
    kv_lens: jax.Array,
    block_tables: jax.Array,
    *,
    sm_scale: float | None = None,
) -> jax.Array:
    """Ragged causal attention over paged KV. Padded rows (beyond cu_q_lens[-1]) return zeros. -> [T, Hq, D]."""
    t_total, hq, d = q.shape
    hkv = k_pages.shape[0]
    scale = _default_scale(d, sm_scale)
    seq, real = token_sequence_ids(cu_q_lens, t_total)
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    # Absolute position of each new token inside its sequence.
    pos = kv_lens[seq] - q_lens[seq] + (jnp.arange(t_total) - cu_q_lens[seq])
    k = gather_sequence_kv(k_pages, block_tables).astype(jnp.float32)[seq]  # [T, Hkv, C, D]
    v = gather_sequence_kv(v_pages, block_tables).astype(jnp.float32)[seq]
    qg = q.astype(jnp.float32).reshape(t_total, hkv, hq // hkv, d)
    scores = jnp.einsum("thgd,thcd->thgc", qg, k) * scale
    valid = (jnp.arange(k.shape[2])[None, :] <= pos[:, None]) & real[:, None]  # [T, C]
    scores = jnp.where(valid[:, None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(jnp.where(real[:, None, None, None], scores, 0.0), axis=-1)
    probs = jnp.where(valid[:, None, None, :], probs, 0.0)
    out = jnp.einsum("thgc,thcd->thgd", probs, v).reshape(t_total, hq, d)
    return out.astype(q.dtype)


def write_kv_pages(
    k_pages: jax.Array, v_pages: jax.Array, new_k: jax.Array, new_v: jax.Array, slot_mapping: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Scatter new tokens' K/V `[T, Hkv, D]` to flat slots `page * page_size + offset`.

    Under `jit` with the pages donated this is an in-place update: the cache is never copied.
    """
    hkv, num_pages, page_size, d = k_pages.shape
    page, offset = slot_mapping // page_size, slot_mapping % page_size
    k_pages = k_pages.at[:, page, offset].set(new_k.transpose(1, 0, 2).astype(k_pages.dtype))
    v_pages = v_pages.at[:, page, offset].set(new_v.transpose(1, 0, 2).astype(v_pages.dtype))
    return k_pages, v_pages
