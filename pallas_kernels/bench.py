"""Benchmark the Pallas paged attention kernels against JAX's Triton kernel and plain XLA.

    python -m pallas_kernels.bench [--small] [--out FILE.json]

Full size (needs a GPU): Llama-3-8B attention shapes (32 q heads, 8 kv heads, head_dim 128, page 16, bf16);
decode at B=64 with context 512/2048/8192, prefill of one sequence of 1k/4k/16k tokens.
Decode GB/s counts the K+V bytes read; prefill TFLOP/s counts causal work, 2 * 2 * T^2 / 2 * Hq * D.
`--small` runs tiny shapes in interpret mode on CPU (JAX's Triton kernel is skipped there).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.decode import paged_decode_attention
from pallas_kernels.prefill import paged_prefill_attention
from pallas_kernels.reference import (
    gather_sequence_kv,
    paged_decode_attention_reference,
    paged_prefill_attention_reference,
)
from tokenflow_jax.kv.pages import pages_for

# The XLA prefill reference gathers KV once per query token: skip it where that would not fit in memory.
REFERENCE_PREFILL_MAX_BYTES = 8 << 30


class Shape(NamedTuple):
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: Any


LLAMA3_8B = Shape(32, 8, 128, 16, jnp.bfloat16)
TINY = Shape(8, 2, 64, 16, jnp.float32)


def time_ms(fn: Callable[[], jax.Array], *, warmup: int, iters: int) -> float:
    """Median wall time of `fn()` in ms, each call waited on; warm-up calls absorb compilation."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def decode_kv_bytes(batch: int, context: int, shape: Shape) -> int:
    return 2 * batch * context * shape.num_kv_heads * shape.head_dim * jnp.dtype(shape.dtype).itemsize


def prefill_causal_flops(tokens: int, shape: Shape) -> float:
    return 2 * 2 * tokens**2 / 2 * shape.num_q_heads * shape.head_dim


def random_pool(
    rng: np.random.Generator, batch: int, context: int, shape: Shape
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """K/V pools holding `batch` sequences of `context` tokens on shuffled pages (page 0 is the null page)."""
    pages_per_seq = pages_for(context, shape.page_size)
    num_pages = 1 + batch * pages_per_seq
    pool_shape = (shape.num_kv_heads, num_pages, shape.page_size, shape.head_dim)
    k_pages = jax.random.normal(jax.random.key(int(rng.integers(1 << 30))), pool_shape, shape.dtype)
    v_pages = jax.random.normal(jax.random.key(int(rng.integers(1 << 30))), pool_shape, shape.dtype)
    block_tables = rng.permutation(np.arange(1, num_pages)).reshape(batch, pages_per_seq)
    return k_pages, v_pages, jnp.asarray(block_tables, jnp.int32)


def best_of(configs: dict[str, Callable[[], jax.Array]], **timing: int) -> tuple[float, str]:
    """Fastest (ms, config name) over configs that compile; configs that fail are reported and skipped."""
    results = []
    for name, fn in configs.items():
        try:
            results.append((time_ms(fn, **timing), name))
        except Exception as error:  # a tiling that does not compile for this shape is not fatal
            print(f"  config {name} failed: {type(error).__name__}: {str(error)[:120]}", file=sys.stderr)
    return min(results) if results else (float("nan"), "none")


def bench_decode(context: int, batch: int, shape: Shape, *, on_gpu: bool, **timing: int) -> dict[str, Any]:
    rng = np.random.default_rng(context)
    k_pages, v_pages, block_tables = random_pool(rng, batch, context, shape)
    q = jax.random.normal(jax.random.key(context), (batch, shape.num_q_heads, shape.head_dim), shape.dtype)
    lengths = jnp.full((batch,), context, jnp.int32)
    args = (q, k_pages, v_pages, lengths, block_tables)

    ours_configs = {"default": functools.partial(paged_decode_attention, *args, interpret=not on_gpu)}
    if on_gpu:
        for pages, warps in ((4, 4), (8, 8), (16, 8)):
            ours_configs[f"pages_per_block={pages},num_warps={warps}"] = functools.partial(
                paged_decode_attention, *args, pages_per_block=pages, num_warps=warps
            )
    row: dict[str, Any] = {"kernel": "decode", "size": context, "batch": batch}
    row["ours_ms"], row["ours_config"] = best_of(ours_configs, **timing)
    row["xla_ms"] = time_ms(functools.partial(jax.jit(paged_decode_attention_reference), *args), **timing)

    if on_gpu:
        from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged

        # JAX's kernel applies no softmax scale and takes (block_tables, lengths) in the other order.
        q_scaled = q * jnp.asarray(shape.head_dim**-0.5, q.dtype)
        jax_args = (q_scaled, k_pages, v_pages, block_tables, lengths)
        jax_configs = {
            f"pages_per_compute_block={pages},k_splits={splits}": functools.partial(
                jax_paged.paged_attention, *jax_args, pages_per_compute_block=pages, k_splits=splits
            )
            for pages, splits in ((8, 16), (4, 8), (16, 4))
        }
        row["jax_ms"], row["jax_config"] = best_of(jax_configs, **timing)
    else:
        row["jax_ms"], row["jax_config"] = None, "skipped: JAX's Triton kernel needs a GPU"

    gigabytes = decode_kv_bytes(batch, context, shape) / 1e9
    for impl in ("ours", "xla", "jax"):
        ms = row[f"{impl}_ms"]
        row[f"{impl}_gbps"] = None if ms is None else gigabytes / (ms / 1e3)
    return row


def dense_prefill(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array) -> jax.Array:
    """Baseline for one sequence: gather its pages, then XLA's dense causal attention."""
    k = gather_sequence_kv(k_pages, block_tables)[0].transpose(1, 0, 2)[None]  # [1, C, Hkv, D]
    v = gather_sequence_kv(v_pages, block_tables)[0].transpose(1, 0, 2)[None]
    return jax.nn.dot_product_attention(q[None], k, v, is_causal=True)[0]


def bench_prefill(tokens: int, shape: Shape, *, on_gpu: bool, **timing: int) -> dict[str, Any]:
    rng = np.random.default_rng(tokens)
    k_pages, v_pages, block_tables = random_pool(rng, 1, tokens, shape)
    q = jax.random.normal(jax.random.key(tokens), (tokens, shape.num_q_heads, shape.head_dim), shape.dtype)
    cu_q_lens = jnp.asarray([0, tokens], jnp.int32)
    kv_lens = jnp.asarray([tokens], jnp.int32)
    args = (q, k_pages, v_pages, cu_q_lens, kv_lens, block_tables)

    ours_configs = {"default": functools.partial(paged_prefill_attention, *args, interpret=not on_gpu)}
    if on_gpu:
        for block_q, pages, warps in ((16, 4, 4), (32, 8, 8), (16, 8, 8)):
            ours_configs[f"block_q={block_q},pages_per_block={pages},num_warps={warps}"] = functools.partial(
                paged_prefill_attention, *args, block_q=block_q, pages_per_block=pages, num_warps=warps
            )
    row: dict[str, Any] = {"kernel": "prefill", "size": tokens, "batch": 1}
    row["ours_ms"], row["ours_config"] = best_of(ours_configs, **timing)
    row["dense_ms"] = time_ms(functools.partial(jax.jit(dense_prefill), q, k_pages, v_pages, block_tables), **timing)
    gathered_bytes = 2 * tokens * tokens * shape.num_kv_heads * shape.head_dim * 4
    row["xla_ms"] = (
        time_ms(functools.partial(jax.jit(paged_prefill_attention_reference), *args), **timing)
        if gathered_bytes <= REFERENCE_PREFILL_MAX_BYTES
        else None
    )
    teraflops = prefill_causal_flops(tokens, shape) / 1e12
    for impl in ("ours", "dense", "xla"):
        ms = row[f"{impl}_ms"]
        row[f"{impl}_tflops"] = None if ms is None else teraflops / (ms / 1e3)
    return row


def _fmt(value: float | None, width: int, spec: str = ".3f") -> str:
    text = "-" if value is None or value != value else format(value, spec)
    return text.rjust(width)


def _ratio(baseline_ms: float | None, ours_ms: float, width: int) -> str:
    """How many times faster ours is than the baseline."""
    return ("-" if baseline_ms is None else f"{baseline_ms / ours_ms:.2f}x").rjust(width)


def print_table(rows: list[dict[str, Any]]) -> None:
    baselines = ("jax", "dense", "xla")
    print(
        f"{'kernel':8}{'size':>6}{'ours ms':>10}{'rate':>14}"
        + "".join(f"{name + ' ms':>10}" for name in baselines)
        + "".join(f"{'vs ' + name:>10}" for name in baselines)
    )
    for row in rows:
        unit, rate = ("GB/s", row["ours_gbps"]) if row["kernel"] == "decode" else ("TF/s", row["ours_tflops"])
        print(
            f"{row['kernel']:8}{row['size']:>6}{_fmt(row['ours_ms'], 10)}{_fmt(rate, 9, '.4g')} {unit}"
            + "".join(_fmt(row.get(f"{name}_ms"), 10) for name in baselines)
            + "".join(_ratio(row.get(f"{name}_ms"), row["ours_ms"], 10) for name in baselines)
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny shapes in interpret mode (CPU)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)

    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not args.small:
        parser.error("the full-size bench needs a GPU; use --small on CPU")
    if args.small:
        shape, batch, contexts, prefill_tokens = TINY, 2, (64, 128), (64, 128)
        timing = {"warmup": 1, "iters": 3}
    else:
        shape, batch, contexts, prefill_tokens = LLAMA3_8B, 64, (512, 2048, 8192), (1024, 4096, 16384)
        timing = {"warmup": 3, "iters": 20}

    rows = [bench_decode(c, batch, shape, on_gpu=on_gpu, **timing) for c in contexts]
    rows += [bench_prefill(t, shape, on_gpu=on_gpu, **timing) for t in prefill_tokens]
    result = {
        "device": str(jax.devices()[0].device_kind),
        "jax_version": jax.__version__,
        "interpret": not on_gpu,
        "shape": {**shape._asdict(), "dtype": jnp.dtype(shape.dtype).name},
        "timing": timing,
        "rows": rows,
    }
    print(f"device: {result['device']}  jax {jax.__version__}  interpret={not on_gpu}  shape={result['shape']}")
    print_table(rows)
    if not on_gpu:
        print("note: JAX's paged_attention (Triton) skipped on CPU; interpret-mode times say nothing about GPUs")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
