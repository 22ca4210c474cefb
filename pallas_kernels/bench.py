"""Benchmark the Pallas paged attention kernels against JAX's Triton kernel and plain XLA.

    python -m pallas_kernels.bench [--small] [--out FILE.json] [--tiles-out TILES.json]

Full size (needs a GPU): Llama-3-8B attention shapes (32 q heads, 8 kv heads, head_dim 128, page 16, bf16);
decode at B=64 and B=1 (where the context split matters) with context 512/2048/8192, prefill of one sequence
of 1k/4k/16k tokens. Each of our kernels runs a few tilings and keeps the fastest; `--tiles-out` writes the
winners as a tile table (`pallas_kernels/tiles.py`; copy it over `pallas_kernels/tiles.json`, or point
PALLAS_TILES at it). Decode GB/s counts the K+V bytes read; prefill TFLOP/s counts causal work,
2 * 2 * T^2 / 2 * Hq * D. `--small` runs tiny shapes in interpret mode on CPU (JAX's Triton kernel is skipped
there; its tile table holds the default tilings, timed in interpret mode, so it says nothing about a GPU).
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

from pallas_kernels.decode import padded_group, paged_decode_attention
from pallas_kernels.prefill import paged_prefill_attention
from pallas_kernels.reference import (
    gather_sequence_kv,
    paged_decode_attention_reference,
    paged_prefill_attention_reference,
)
from pallas_kernels.tiles import decode_tiles, prefill_tiles, write_table
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


def jax_paged_attention() -> Any:
    """JAX's own Pallas (Triton) paged attention module, or None where this jax has none."""
    try:
        from jax.experimental.pallas.ops.gpu import paged_attention
    except ImportError:
        return None
    return paged_attention


def bench_decode(context: int, batch: int, shape: Shape, *, on_gpu: bool, **timing: int) -> dict[str, Any]:
    rng = np.random.default_rng(context)
    k_pages, v_pages, block_tables = random_pool(rng, batch, context, shape)
    q = jax.random.normal(jax.random.key(context), (batch, shape.num_q_heads, shape.head_dim), shape.dtype)
    lengths = jnp.full((batch,), context, jnp.int32)
    args = (q, k_pages, v_pages, lengths, block_tables)

    table = decode_tiles(batch, shape.num_kv_heads, block_tables.shape[1], shape.page_size)
    tilings = [(table.pages_per_block, table.num_splits, table.num_warps)]
    if on_gpu:
        tilings += [(8, 1, 4), (8, 4, 4), (8, 16, 4), (4, 8, 4), (16, 1, 8)]
    ours_configs = {
        f"pages_per_block={pages},num_splits={splits},num_warps={warps}": functools.partial(
            paged_decode_attention,
            *args,
            interpret=not on_gpu,
            pages_per_block=pages,
            num_splits=splits,
            num_warps=warps,
            num_stages=table.num_stages,
        )
        for pages, splits, warps in dict.fromkeys(tilings)
    }
    row: dict[str, Any] = {"kernel": "decode", "size": context, "batch": batch}
    row["ours_ms"], row["ours_config"] = best_of(ours_configs, **timing)
    row["xla_ms"] = time_ms(functools.partial(jax.jit(paged_decode_attention_reference), *args), **timing)

    jax_paged = jax_paged_attention() if on_gpu else None
    if jax_paged is not None:
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
        why = "not importable in this jax" if on_gpu else "needs a GPU"
        row["jax_ms"], row["jax_config"] = None, f"skipped: JAX's Triton paged attention {why}"

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

    table = prefill_tiles(tokens, shape.page_size)
    group = padded_group(shape.num_q_heads // shape.num_kv_heads)
    tilings = [(table.block_rows // group, table.pages_per_block, table.num_warps)]
    if on_gpu:
        tilings += [(16, 4, 4), (32, 8, 8), (16, 8, 8)]
    ours_configs = {
        f"block_q={block_q},pages_per_block={pages},num_warps={warps}": functools.partial(
            paged_prefill_attention,
            *args,
            interpret=not on_gpu,
            block_q=block_q,
            pages_per_block=pages,
            num_warps=warps,
            num_stages=table.num_stages,
        )
        for block_q, pages, warps in dict.fromkeys(tilings)
    }
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


def config_values(config: str) -> dict[str, int]:
    """ "a=1,b=2" (a config name from the sweep) -> {"a": 1, "b": 2}."""
    return {key: int(value) for key, value in (item.split("=") for item in config.split(","))}


def tile_table(rows: list[dict[str, Any]], shape: Shape, result: dict[str, Any]) -> dict[str, Any]:
    """The fastest tiling of each measured shape, as the tile table `pallas_kernels.tiles` reads."""
    group = padded_group(shape.num_q_heads // shape.num_kv_heads)
    decode, prefill = [], []
    for row in rows:
        if row["ours_config"] == "none":
            continue
        config = config_values(row["ours_config"])
        tokens_per_block = config["pages_per_block"] * shape.page_size
        launch = {"num_warps": config["num_warps"], "num_stages": 2}
        if row["kernel"] == "decode":
            decode.append(
                {"sequence_heads": row["batch"] * shape.num_kv_heads, "context": row["size"]}
                | {"tokens_per_block": tokens_per_block, "num_splits": config["num_splits"]}
                | launch
            )
        else:
            prefill.append(
                {"tokens": row["size"], "block_rows": config["block_q"] * group, "tokens_per_block": tokens_per_block}
                | launch
            )
    source = "python -m pallas_kernels.bench" + (
        " --small (interpret mode: not a measurement)" if result["interpret"] else ""
    )
    return {"source": source, "device": result["device"], "jax_version": result["jax_version"]} | {
        "decode": decode,
        "prefill": prefill,
    }


def _fmt(value: float | None, width: int, spec: str = ".3f") -> str:
    text = "-" if value is None or value != value else format(value, spec)
    return text.rjust(width)


def _ratio(baseline_ms: float | None, ours_ms: float, width: int) -> str:
    """How many times faster ours is than the baseline."""
    return ("-" if baseline_ms is None else f"{baseline_ms / ours_ms:.2f}x").rjust(width)


def print_table(rows: list[dict[str, Any]]) -> None:
    baselines = ("jax", "dense", "xla")
    print(
        f"{'kernel':8}{'batch':>6}{'size':>6}{'ours ms':>10}{'rate':>14}"
        + "".join(f"{name + ' ms':>10}" for name in baselines)
        + "".join(f"{'vs ' + name:>10}" for name in baselines)
        + "  our tiling"
    )
    for row in rows:
        unit, rate = ("GB/s", row["ours_gbps"]) if row["kernel"] == "decode" else ("TF/s", row["ours_tflops"])
        print(
            f"{row['kernel']:8}{row['batch']:>6}{row['size']:>6}{_fmt(row['ours_ms'], 10)}{_fmt(rate, 9, '.4g')} {unit}"
            + "".join(_fmt(row.get(f"{name}_ms"), 10) for name in baselines)
            + "".join(_ratio(row.get(f"{name}_ms"), row["ours_ms"], 10) for name in baselines)
            + f"  {row['ours_config']}"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny shapes in interpret mode (CPU)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--tiles-out", help="write the fastest tiling of each shape here, as a tile table")
    args = parser.parse_args(argv)

    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not args.small:
        parser.error("the full-size bench needs a GPU; use --small on CPU")
    if args.small:
        shape, batches, contexts, prefill_tokens = TINY, (2, 1), (64, 128), (64, 128)
        timing = {"warmup": 1, "iters": 3}
    else:
        shape, batches, contexts, prefill_tokens = LLAMA3_8B, (64, 1), (512, 2048, 8192), (1024, 4096, 16384)
        timing = {"warmup": 3, "iters": 20}

    rows = [bench_decode(c, b, shape, on_gpu=on_gpu, **timing) for b in batches for c in contexts]
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
    if args.tiles_out:
        write_table(args.tiles_out, tile_table(rows, shape, result))
    return result


if __name__ == "__main__":
    main()
