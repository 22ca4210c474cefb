"""Per-request sampling (greedy, temperature, top-k, top-p, seed) inside a batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tokenflow_jax.sampling_params import SamplingParams

__all__ = ["SamplingParams", "sample"]


TOP_K_WITHOUT_SORT = 64  # largest top_k a batch without top-p filters by `lax.top_k` (above: one full sort)


def sample(
    logits: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    seeds: jax.Array,
    steps: jax.Array,
) -> jax.Array:
    """Pick one token per row. logits [B, V] float32; per-row temperature, top_k, top_p, seed and step.

    The key of row b is fold_in(PRNGKey(seed_b), step_b): a request samples the same tokens whatever batch it
    shares, which keeps outputs identical across preemption and resumption.
    """
    greedy = _argmax(logits)
    # An all-greedy batch (the common serving case) skips the filters and the draw.
    return jax.lax.cond(
        jnp.any(temperature > 0),
        lambda: _draw(logits, temperature, top_k, top_p, seeds, steps, greedy),
        lambda: greedy,
    )


def _argmax(logits: jax.Array) -> jax.Array:
    """First index of each row's largest logit: two plain reductions (XLA's variadic argmax reduction is ~2x
    slower on CPU)."""
    vocab = logits.shape[-1]
    best = jnp.max(logits, axis=-1, keepdims=True)
    first = jnp.min(jnp.where(logits == best, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)
    return jnp.minimum(first, vocab - 1)  # a NaN row still names a token


def _draw(
    logits: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    seeds: jax.Array,
    steps: jax.Array,
    greedy: jax.Array,
) -> jax.Array:
    """Temperature, top-k and top-p draws for the rows that sample; greedy rows keep `greedy`.

    Each filter costs only where a row asks for it: no filter, top-k alone by `lax.top_k`, a full sort only
    with top-p (or a top_k past TOP_K_WITHOUT_SORT). A row's kept set is the same whichever way its batch goes.
    """
    vocab = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    k = jnp.where((top_k > 0) & (temperature > 0), jnp.minimum(top_k, vocab), vocab)
    nucleus = (top_p < 1.0) & (temperature > 0)
    limit = min(TOP_K_WITHOUT_SORT, vocab)
    way = jnp.where(jnp.any(nucleus) | jnp.any((k > limit) & (k < vocab)), 2, jnp.where(jnp.any(k < vocab), 1, 0))
    scaled = jax.lax.switch(
        way,
        [lambda x: x, lambda x: _top_k(x, k, limit), lambda x: _top_k_top_p(x, k, top_p, nucleus)],
        scaled,
    )
    keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.PRNGKey(s), t))(seeds, steps)
    drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)


def _top_k(scaled: jax.Array, k: jax.Array, limit: int) -> jax.Array:
    """Keep logits >= the k-th largest, for k <= limit (k = vocab keeps everything)."""
    largest = jax.lax.top_k(scaled, limit)[0]
    kth = jnp.take_along_axis(largest, jnp.minimum(k, limit)[:, None] - 1, axis=-1)
    kth = jnp.where((k < scaled.shape[-1])[:, None], kth, -jnp.inf)
    return jnp.where(scaled < kth, -jnp.inf, scaled)


def _top_k_top_p(scaled: jax.Array, k: jax.Array, top_p: jax.Array, nucleus: jax.Array) -> jax.Array:
    """Top-k, then the smallest prefix of sorted tokens whose probability mass reaches p (rows in `nucleus`)."""
    vocab = scaled.shape[-1]
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
    kth = jnp.take_along_axis(sorted_logits, (k - 1)[:, None], axis=-1)
    scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    sorted_probs = jax.nn.softmax(jnp.where(jnp.arange(vocab)[None, :] < k[:, None], sorted_logits, -jnp.inf))
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = mass_before < top_p[:, None]
    cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    cutoff = jnp.where(nucleus[:, None], cutoff, -jnp.inf)  # top_p = 1 keeps all, whatever the rounding
    return jnp.where(scaled < cutoff, -jnp.inf, scaled)
