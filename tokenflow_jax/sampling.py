"""Per-request sampling (greedy, temperature, top-k, top-p, seed) inside a batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tokenflow_jax.sampling_params import SamplingParams

__all__ = ["SamplingParams", "sample"]


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
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # An all-greedy batch (the common serving case) skips the full-vocabulary sort and the draw.
    return jax.lax.cond(
        jnp.any(temperature > 0),
        lambda: _draw(logits, temperature, top_k, top_p, seeds, steps, greedy),
        lambda: greedy,
    )


def _draw(
    logits: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    seeds: jax.Array,
    steps: jax.Array,
    greedy: jax.Array,
) -> jax.Array:
    """Temperature, top-k and top-p draws for the rows that sample; greedy rows keep `greedy`."""
    vocab = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
    # top-k: keep logits >= the k-th largest (k = 0 keeps everything).
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_logits, (k - 1)[:, None], axis=-1)
    scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    # top-p: keep the smallest prefix of sorted tokens whose probability mass reaches p.
    sorted_probs = jax.nn.softmax(jnp.where(jnp.arange(vocab)[None, :] < k[:, None], sorted_logits, -jnp.inf))
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = mass_before < top_p[:, None]
    cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    scaled = jnp.where(scaled < cutoff, -jnp.inf, scaled)
    keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.PRNGKey(s), t))(seeds, steps)
    drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)
