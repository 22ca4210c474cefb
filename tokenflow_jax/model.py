"""Llama / Qwen2 / Mistral decoder as pure functions over a params pytree, reading and writing a paged KV cache.

Params pytree (weights stored `[in, out]`):
    {"embed": [V, d], "final_norm": [d], "lm_head": [d, V] (absent when tied),
     "layers": [{"attn_norm", "wq", "wk", "wv", "wo", ("bq", "bk", "bv" for Qwen2),
                 "mlp_norm", "w_gate", "w_up", "w_down"}, ...]}
KV cache: a list with one `(k_pages, v_pages)` pair per layer, each `[num_kv_heads, num_pages, page_size, head_dim]`.
Keeping layers as separate arrays lets kernels read a layer's pages without slicing (and copying) a stacked cache.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import reference as attention_reference
from tokenflow_jax.attention import paged_attention
from tokenflow_jax.config import ModelConfig

Params = dict[str, Any]
KVCache = list[tuple[jax.Array, jax.Array]]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Where a ragged batch of new tokens lives in the page pool.

    slot_mapping [T]: flat slot (page * page_size + offset) each new token's K/V is written to; padding -> page 0.
    cu_q_lens [B+1]: cumulative new-token counts per sequence; kv_lens [B]: cached tokens including new ones.
    block_tables [B, max_pages]: page ids per sequence, unused entries 0.
    """

    slot_mapping: jax.Array
    cu_q_lens: jax.Array
    kv_lens: jax.Array
    block_tables: jax.Array


def init_params(cfg: ModelConfig, key: jax.Array, dtype: Any = jnp.float32) -> Params:
    """Deterministic random weights (the `tiny-random` preset and dummy-weight benchmarks)."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    # Per layer: 7 weight matrices + 3 attention biases (Qwen2); plus embed and lm_head.
    keys = iter(jax.random.split(key, 10 * cfg.num_layers + 2))

    def dense(shape: tuple[int, ...], fan_in: int) -> jax.Array:
        return (jax.random.normal(next(keys), shape, jnp.float32) / math.sqrt(fan_in)).astype(dtype)

    layers = []
    for _ in range(cfg.num_layers):
        layer = {
            "attn_norm": jnp.ones((d,), dtype),
            "wq": dense((d, cfg.num_heads * hd), d),
            "wk": dense((d, cfg.num_kv_heads * hd), d),
            "wv": dense((d, cfg.num_kv_heads * hd), d),
            "wo": dense((cfg.num_heads * hd, d), cfg.num_heads * hd),
            "mlp_norm": jnp.ones((d,), dtype),
            "w_gate": dense((d, f), d),
            "w_up": dense((d, f), d),
            "w_down": dense((f, d), f),
        }
        if cfg.attention_bias:
            layer["bq"] = dense((cfg.num_heads * hd,), 1) * 0.1
            layer["bk"] = dense((cfg.num_kv_heads * hd,), 1) * 0.1
            layer["bv"] = dense((cfg.num_kv_heads * hd,), 1) * 0.1
        layers.append(layer)
    params: Params = {
        "embed": dense((cfg.vocab_size, d), 1),
        "layers": layers,
        "final_norm": jnp.ones((d,), dtype),
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = dense((d, cfg.vocab_size), d)
    return params


def init_kv_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype: Any = jnp.float32) -> KVCache:
    shape = (cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)]


def rope_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """(inverse RoPE frequencies, scale of cos and sin), as transformers computes them for each rope type.

    `dynamic` NTK scaling only changes frequencies past `max_position_embeddings`, which the engine never serves
    (`config.max_context`), so it is plain RoPE here as in HF.
    """
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    scaling = cfg.rope_scaling_dict or {}
    rope_type = scaling.get("rope_type", scaling.get("type"))
    scale = 1.0
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = np.where(
            wavelen > old_ctx / low, inv_freq / factor, np.where(wavelen < old_ctx / high, inv_freq, smoothed)
        )
    elif rope_type == "yarn":
        inv_freq, scale = _yarn(inv_freq, scaling, cfg)
    return inv_freq.astype(np.float32), scale


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(inv_freq: np.ndarray, scaling: dict[str, Any], cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """YaRN (Qwen2.5's long context): interpolate low frequencies, keep high ones, ramp between; scale cos/sin."""
    old_ctx = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or cfg.max_position_embeddings / old_ctx
    scale = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if scale is None and mscale and mscale_all_dim:
        scale = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    elif scale is None:
        scale = _yarn_mscale(factor)
    dim, base = cfg.head_dim, cfg.rope_theta

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / ((high - low) or 0.001), 0, 1)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp), float(scale)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, scale: float = 1.0) -> jax.Array:
    """Rotate-half RoPE (the HF convention), cos and sin times `scale`. x [T, H, D], positions [T]."""
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]  # [T, D/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, None, :] * scale
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, None, :] * scale
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


AttentionFn = Callable[..., jax.Array]
ATTENTION_IMPLS = ("xla", "reference", "pallas", "pallas_interpret")


def attention_functions(impl: str) -> tuple[AttentionFn, AttentionFn]:
    """(decode, prefill) attention over the pages for `impl` in {"reference", "pallas", "pallas_interpret"}
    ("xla" also reads the new tokens' own K/V: `forward` calls `tokenflow_jax.attention` for it)."""
    if impl == "reference":
        return (
            attention_reference.paged_decode_attention_reference,
            attention_reference.paged_prefill_attention_reference,
        )
    import pallas_kernels

    interpret = impl == "pallas_interpret"
    if impl not in ("pallas", "pallas_interpret"):
        raise ValueError(f"unknown attention implementation {impl!r}; expected one of {ATTENTION_IMPLS}")

    def decode(*args: Any, **kw: Any) -> jax.Array:
        return pallas_kernels.paged_decode_attention(*args, interpret=interpret, **kw)

    def prefill(*args: Any, **kw: Any) -> jax.Array:
        return pallas_kernels.paged_prefill_attention(*args, interpret=interpret, **kw)

    return decode, prefill


def forward(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    kv_cache: KVCache,
    meta: AttentionMetadata,
    logits_indices: jax.Array,
    *,
    decode: bool = False,
    attention_impl: str = "reference",
    tp_axis: str | None = None,
) -> tuple[jax.Array, KVCache]:
    """Run new tokens [T] through the model, writing their K/V to the page pool.

    Returns float32 logits for the rows `logits_indices` [N] and the updated cache. With `decode=True` every
    sequence contributes exactly one token (T == B) and the decode attention kernel is used. Under tensor
    parallelism (`tokenflow_jax.parallel`) this runs on each device's slice of the weights and pages, inside
    `shard_map` over mesh axis `tp_axis`: its heads, hidden units and vocabulary rows, a `psum` after each
    row-split projection and an all-gather of the logits.
    """
    decode_attn, prefill_attn = (None, None) if attention_impl == "xla" else attention_functions(attention_impl)
    inv_freq, rope_scale = rope_frequencies(cfg)
    t = tokens.shape[0]
    hd = cfg.head_dim

    def all_reduce(y: jax.Array) -> jax.Array:
        return y if tp_axis is None else jax.lax.psum(y, tp_axis)

    x = _embed(params["embed"], tokens, cfg.vocab_size, tp_axis)
    new_cache: KVCache = []
    for layer, (k_pages, v_pages) in zip(params["layers"], kv_cache, strict=True):
        hq, hkv = layer["wq"].shape[1] // hd, layer["wk"].shape[1] // hd  # this device's heads
        h = rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps)
        q, k, v = h @ layer["wq"], h @ layer["wk"], h @ layer["wv"]
        if cfg.attention_bias:
            q, k, v = q + layer["bq"], k + layer["bk"], v + layer["bv"]
        q = apply_rope(q.reshape(t, hq, hd), positions, inv_freq, rope_scale)
        k = apply_rope(k.reshape(t, hkv, hd), positions, inv_freq, rope_scale)
        v = v.reshape(t, hkv, hd)
        k_pages, v_pages = attention_reference.write_kv_pages(k_pages, v_pages, k, v, meta.slot_mapping)
        new_cache.append((k_pages, v_pages))
        if attention_impl == "xla":
            attn = paged_attention(q, k, v, k_pages, v_pages, meta.cu_q_lens, meta.kv_lens, meta.block_tables,
                                   decode=decode)  # fmt: skip
        elif decode:
            attn = decode_attn(q, k_pages, v_pages, meta.kv_lens, meta.block_tables)
        else:
            attn = prefill_attn(q, k_pages, v_pages, meta.cu_q_lens, meta.kv_lens, meta.block_tables)
        x = x + all_reduce(attn.reshape(t, hq * hd).astype(x.dtype) @ layer["wo"])
        h = rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps)
        x = x + all_reduce((jax.nn.silu(h @ layer["w_gate"]) * (h @ layer["w_up"])) @ layer["w_down"])
    x = rms_norm(x[logits_indices], params["final_norm"], cfg.rms_norm_eps)
    lm_head = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    logits = jnp.dot(x, lm_head, preferred_element_type=jnp.float32)
    if logits.shape[-1] != cfg.vocab_size:  # this device's vocabulary: every device samples from all of it
        logits = jax.lax.all_gather(logits, tp_axis, axis=1, tiled=True)
    return logits, new_cache


def _embed(table: jax.Array, tokens: jax.Array, vocab_size: int, tp_axis: str | None) -> jax.Array:
    """Embedding rows of `tokens`; a table split by vocabulary rows (`tokenflow_jax.parallel`) looks up the tokens
    it holds and the devices' rows are summed (each token's from one device, zeros from the rest)."""
    if table.shape[0] == vocab_size:
        return table[tokens]
    rows = table.shape[0]
    local = tokens - jax.lax.axis_index(tp_axis) * rows
    held = (local >= 0) & (local < rows)
    return jax.lax.psum(jnp.where(held[:, None], table[jnp.clip(local, 0, rows - 1)], 0), tp_axis)
