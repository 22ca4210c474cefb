"""Tensor parallelism over a `jax.sharding.Mesh`: which devices, how the weights and the KV pages split.

Megatron-style (docs/DESIGN.md, section 8): q/k/v projections and the MLP's gate and up projections are split by
output columns (whole heads, whole hidden units), the attention output and MLP down projections by input rows, so
every device computes its heads and hidden units alone and one all-reduce (`lax.psum`) after each row-split
projection sums the partial outputs. The KV page pool is split by kv heads: each device holds its heads' slice of
every page. The embedding and the LM head are split by vocabulary rows (a token's row lives on one device, the
others add zeros; each device computes its vocabulary's logits and an all-gather joins them), where the
vocabulary divides evenly, else replicated. When N exceeds the kv heads (N a multiple of them), each kv head is
replicated N / kv_heads times, as vLLM does, so each device still holds one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tokenflow_jax.config import ModelConfig

TP_AXIS = "tp"
KV_SPEC = P(TP_AXIS)  # a layer's [Hkv, pages, page_size, head_dim] K or V pages, split by kv heads
BLOCK_SPEC = P(None, None, None, TP_AXIS)  # a transfer block [pages, layers, 2, Hkv, page_size, head_dim]

_COLUMN_SPLIT = ("wq", "wk", "wv", "w_gate", "w_up")  # [in, out]: whole heads / hidden units per device
_ROW_SPLIT = ("wo", "w_down")  # [in, out]: partial sums, all-reduced
_BIAS_SPLIT = ("bq", "bk", "bv")


def kv_head_replicas(cfg: ModelConfig, tensor_parallel_size: int) -> int:
    """How many copies of each kv head N devices need (1 unless N exceeds the kv heads); ValueError naming the
    head counts when the mesh cannot split them."""
    n = tensor_parallel_size
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {n!r}")
    hq, hkv = cfg.num_heads, cfg.num_kv_heads
    if hq % n:
        raise ValueError(f"tensor_parallel_size {n} does not divide the model's {hq} attention (query) heads")
    if hkv % n == 0:
        return 1
    if n % hkv == 0:
        return n // hkv
    raise ValueError(
        f"tensor_parallel_size {n} neither divides the model's {hkv} kv heads nor is a multiple of them "
        "(kv heads are split across devices, or replicated when there are fewer than devices)"
    )


def sharded_config(cfg: ModelConfig, tensor_parallel_size: int) -> ModelConfig:
    """The config the engine runs at N devices: the kv heads counted after replication (the page pool's shape)."""
    replicas = kv_head_replicas(cfg, tensor_parallel_size)
    return cfg if replicas == 1 else dataclasses.replace(cfg, num_kv_heads=cfg.num_kv_heads * replicas)


def replicate_kv_heads(params: dict[str, Any], cfg: ModelConfig, replicas: int) -> dict[str, Any]:
    """Params whose k/v projections produce each kv head `replicas` times in a row (query head h still reads kv
    head h // (Hq / Hkv) after replication, so attention is unchanged)."""
    if replicas == 1:
        return params
    hd = cfg.head_dim

    def repeat(w: jax.Array) -> jax.Array:
        heads = w.reshape(*w.shape[:-1], cfg.num_kv_heads, hd)
        return jnp.repeat(heads, replicas, axis=-2).reshape(*w.shape[:-1], -1)

    layers = [{k: repeat(v) if k in ("wk", "wv", "bk", "bv") else v for k, v in layer.items()}
              for layer in params["layers"]]  # fmt: skip
    return dict(params, layers=layers)


def check_device_count(what: str, need: int, available: int) -> None:
    """ValueError "`what` needs `need` devices, `available` available" (with how to get more host devices on CPU)."""
    if available < need:
        hint = (" (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N host devices)"
                if jax.default_backend() == "cpu" else "")  # fmt: skip
        raise ValueError(f"{what} needs {need} devices, {available} available{hint}")


def make_mesh(tensor_parallel_size: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: the first N of `jax.devices()`); ValueError when there are too few."""
    available = list(jax.devices()) if devices is None else list(devices)
    check_device_count(f"tensor_parallel_size {tensor_parallel_size}", tensor_parallel_size, len(available))
    if tensor_parallel_size > 1:
        _partition_with_gspmd_where_shardy_crashes()
    return Mesh(np.array(available[:tensor_parallel_size]), (TP_AXIS,))


def _partition_with_gspmd_where_shardy_crashes() -> None:
    """jax 0.11's Shardy partitioner segfaults compiling the sharded steps (in its
    `ManualComputationUnusedInputsPattern`; jax 0.10 compiles them): there, XLA's GSPMD partitions them, with the
    same results. Process-wide, as JAX's flag is."""
    if jax.__version_info__[:2] >= (0, 11) and getattr(jax.config, "jax_use_shardy_partitioner", False):
        jax.config.update("jax_use_shardy_partitioner", False)


def param_specs(params: dict[str, Any], tensor_parallel_size: int) -> dict[str, Any]:
    """A PartitionSpec for every leaf of a params pytree (`model.init_params`' layout) on N devices."""
    vocab = params["embed"].shape[0]
    by_vocab = vocab % tensor_parallel_size == 0

    def spec(name: str) -> P:
        if name in _COLUMN_SPLIT:
            return P(None, TP_AXIS)
        if name in _ROW_SPLIT:
            return P(TP_AXIS, None)
        if name in _BIAS_SPLIT:
            return P(TP_AXIS)
        return P()

    specs = {k: P() for k in params if k != "layers"}
    if by_vocab:  # [V, d] and [d, V]: each device its vocabulary rows
        specs["embed"] = P(TP_AXIS, None)
        if "lm_head" in params:
            specs["lm_head"] = P(None, TP_AXIS)
    specs["layers"] = [{k: spec(k) for k in layer} for layer in params["layers"]]
    return specs


def shard_params(params: dict[str, Any], mesh: Mesh) -> dict[str, Any]:
    """Each device gets its slice of every weight (`param_specs`). Abstract weights (`jax.ShapeDtypeStruct`, to
    lower without allocating) only gain their shardings."""

    def place(x: Any, spec: P) -> Any:
        sharding = NamedSharding(mesh, spec)
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        return jax.device_put(x, sharding)

    return jax.tree.map(place, params, param_specs(params, mesh.size))


def kv_cache_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, KV_SPEC)


def block_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, BLOCK_SPEC)


def sharded_zeros(shape: tuple[int, ...], dtype: Any, sharding: NamedSharding) -> jax.Array:
    """Zeros created on their devices, each holding only its slice (nothing staged on one device first)."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


def host_to_devices(data: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array split onto the mesh: each device receives only its own slice (its own copy)."""
    return jax.make_array_from_callback(data.shape, sharding, lambda index: data[index])


def weight_bytes_per_device(cfg: ModelConfig, tensor_parallel_size: int, itemsize: int) -> int:
    """Bytes of weights each device holds: its slice of the split matrices plus the replicated norms (and the
    embedding and LM head where the vocabulary does not divide); `cfg` as sharded, so replicated kv heads count."""
    d = cfg.hidden_size
    replicated = d + cfg.num_layers * 2 * d  # norms
    if cfg.vocab_size % tensor_parallel_size:
        replicated += cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2)
    return (replicated + (cfg.num_params - replicated) // tensor_parallel_size) * itemsize
