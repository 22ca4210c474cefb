"""Jitted model steps and page transfers over the device page pool. Mechanism only: no policy here.

Every call is padded to a bucket and compiled ahead of time (`warmup`); after warm-up, a call whose shape
was not compiled raises `CompileDuringServing` instead of silently compiling. Every call runs under `shard_map`
on the runner's mesh (`tokenflow_jax.parallel`): one device, or N devices each holding its slice of the weights
and of every KV page, which also gathers and scatters its own slice of the pages it transfers.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tokenflow_jax.batching import RaggedBatch, SequenceChunk, build_ragged_batch
from tokenflow_jax.config import ModelConfig
from tokenflow_jax.engine.buckets import Buckets, CompileDuringServing
from tokenflow_jax.kv.pages import pages_for, transfer_pieces, transfer_slices
from tokenflow_jax.model import AttentionMetadata, KVCache, Params, forward
from tokenflow_jax.parallel import (
    BLOCK_SPEC,
    KV_SPEC,
    TP_AXIS,
    block_sharding,
    host_to_devices,
    kv_cache_sharding,
    make_mesh,
    param_specs,
    shard_params,
    sharded_zeros,
)  # fmt: skip
from tokenflow_jax.sampling import sample


def _step(
    params: Params,
    kv_cache: KVCache,
    batch: dict[str, jax.Array],
    *,
    cfg: ModelConfig,
    decode: bool,
    attention_impl: str,
    max_num_seqs: int,
    tp_axis: str | None,
) -> tuple[jax.Array, KVCache]:
    # Tokens the previous step sampled but the host has not read yet come straight from its output.
    feed = batch["feed_rows"]
    tokens_in = jnp.where(feed >= 0, batch["previous_tokens"][jnp.maximum(feed, 0)], batch["tokens"])
    batch = dict(batch, tokens=tokens_in)
    meta = AttentionMetadata(batch["slot_mapping"], batch["cu_q_lens"], batch["kv_lens"], batch["block_tables"])
    logits, kv_cache = forward(
        params, cfg, batch["tokens"], batch["positions"], kv_cache, meta, batch["logits_indices"],
        decode=decode, attention_impl=attention_impl, tp_axis=tp_axis,
    )  # fmt: skip
    tokens = sample(logits, batch["temperature"], batch["top_k"], batch["top_p"], batch["seeds"], batch["steps"])
    # A fixed width, so any step can feed from any other.
    return jnp.zeros(max_num_seqs, jnp.int32).at[: tokens.shape[0]].set(tokens), kv_cache


def _gather_pages(kv_cache: KVCache, page_ids: jax.Array) -> jax.Array:
    """-> [n, layers, 2, Hkv, S, D]: the listed pages of every layer, page-major (each page one contiguous piece
    of the block, as in the host tier), one block for one copy (per device: its kv heads)."""
    block = jnp.stack([jnp.stack([k[:, page_ids], v[:, page_ids]]) for k, v in kv_cache])
    return jnp.moveaxis(block, 3, 0)


def _scatter_pages(kv_cache: KVCache, page_ids: jax.Array, data: jax.Array) -> KVCache:
    data = jnp.moveaxis(data, 0, 3)  # -> [layers, 2, Hkv, n, S, D], the cache's order
    return [
        (k.at[:, page_ids].set(data[i, 0].astype(k.dtype)), v.at[:, page_ids].set(data[i, 1].astype(v.dtype)))
        for i, (k, v) in enumerate(kv_cache)
    ]


@functools.lru_cache(maxsize=1)
def _compile_counter() -> list[int]:
    """Count backend compilations process-wide (tests assert zero in steady state)."""
    count = [0]

    def on_event(event: str, duration: float, **_: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(on_event)
    return count


def backend_compile_count() -> int:
    return _compile_counter()[0]


class ModelRunner:
    """Owns the device KV page pool and the compiled step and transfer executables, on `mesh` (default: one
    device). `cfg` is the config as sharded (`parallel.sharded_config`) and `params` match it."""

    def __init__(
        self,
        cfg: ModelConfig,
        params: Params,
        *,
        num_pages: int,
        page_size: int,
        max_num_seqs: int,
        max_batch_tokens: int,
        max_model_len: int,
        kv_dtype: Any,
        attention_impl: str = "reference",
        mesh: Mesh | None = None,
    ) -> None:
        _compile_counter()
        self.cfg = cfg
        self.mesh = mesh = make_mesh(1) if mesh is None else mesh
        self.params = shard_params(params, mesh)
        self.page_size = page_size
        self.num_pages = num_pages
        self.attention_impl = attention_impl
        self.max_pages_per_seq = pages_for(max_model_len, page_size)
        self.buckets = Buckets.build(max_num_seqs, max_batch_tokens, self.max_pages_per_seq)
        self.max_num_seqs = max_num_seqs
        shape = (cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
        pages = kv_cache_sharding(mesh)
        zeros = functools.partial(sharded_zeros, shape, kv_dtype, pages)
        self.kv_cache: KVCache = [(zeros(), zeros()) for _ in range(cfg.num_layers)]
        self.page_bytes = int(
            2 * cfg.num_layers * cfg.num_kv_heads * page_size * cfg.head_dim * jnp.dtype(kv_dtype).itemsize
        )
        self._executables: dict[tuple, Any] = {}
        self._serving = False
        tp_axis = TP_AXIS if mesh.size > 1 else None
        step = functools.partial(_step, cfg=cfg, attention_impl=attention_impl, max_num_seqs=max_num_seqs,
                                 tp_axis=tp_axis)  # fmt: skip
        self._no_previous = np.zeros(max_num_seqs, np.int32)
        self._block_sharding = block_sharding(mesh)
        params_spec, kv_spec = param_specs(params, mesh.size), [(KV_SPEC, KV_SPEC)] * cfg.num_layers

        def on_mesh(fn: Callable, in_specs: tuple, out_specs: Any, donate: tuple[int, ...] = ()) -> Any:
            shardings = functools.partial(jax.tree.map, lambda s: NamedSharding(mesh, s),
                                          is_leaf=lambda x: isinstance(x, P))  # fmt: skip
            local = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
            return jax.jit(local, in_shardings=shardings(in_specs), out_shardings=shardings(out_specs),
                           donate_argnums=donate)  # fmt: skip

        steps = (params_spec, kv_spec, P()), (P(), kv_spec)
        self._jit_decode = on_mesh(functools.partial(step, decode=True), *steps, donate=(1,))
        self._jit_mixed = on_mesh(functools.partial(step, decode=False), *steps, donate=(1,))
        self._jit_gather = on_mesh(_gather_pages, (kv_spec, P()), BLOCK_SPEC)
        self._jit_scatter = on_mesh(_scatter_pages, (kv_spec, P(), BLOCK_SPEC), kv_spec, donate=(0,))

    # ---- compilation
    def _executable(self, key: tuple, fn: Callable, *args: Any) -> Any:
        exe = self._executables.get(key)
        if exe is None:
            if self._serving:
                raise CompileDuringServing(f"shape {key} was not compiled at warm-up")
            exe = fn.lower(*args).compile()
            self._executables[key] = exe
        return exe

    def _batch_arrays(
        self, b: RaggedBatch, sampling: dict[str, np.ndarray], feed_rows: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        return {
            "feed_rows": np.full(len(b.tokens), -1, np.int32) if feed_rows is None else feed_rows,
            "tokens": b.tokens, "positions": b.positions, "slot_mapping": b.slot_mapping,
            "cu_q_lens": b.cu_q_lens, "kv_lens": b.kv_lens, "block_tables": b.block_tables,
            "logits_indices": b.logits_indices, **sampling,
        }  # fmt: skip

    def warmup(self, progress: bool = True) -> int:
        """Compile every bucket, then refuse to compile anything else. Returns the number compiled."""
        plan = self.compile_plan()
        try:
            from tqdm import tqdm

            it = tqdm(plan, desc="compiling buckets", disable=not progress, leave=False)
        except ImportError:  # pragma: no cover - tqdm is a dependency
            it = plan
        for key, fn, args in it:
            self._executable(key, fn, *args)
        self._serving = True
        return len(self._executables)

    def compile_plan(self) -> list[tuple[tuple, Callable, tuple]]:
        """(key, jitted function, arguments) for every executable warm-up compiles: each step bucket, then each
        transfer size (also what a cross-platform lowering check walks)."""
        plan: list[tuple[tuple, Callable, tuple]] = []
        for key in self.step_keys():
            batch = dict(self.step_batch_template(key), previous_tokens=self._no_previous)
            plan.append((key, self._jit_decode if key[1] else self._jit_mixed, (self.params, self.kv_cache, batch)))
        page_spec = jax.ShapeDtypeStruct
        k0 = self.kv_cache[0][0]
        for n in self.buckets.transfer_pages:
            ids = page_spec((n,), jnp.int32)
            data = page_spec((n, self.cfg.num_layers, 2, k0.shape[0], self.page_size, k0.shape[3]), k0.dtype)
            plan.append((("gather", n), self._jit_gather, (self.kv_cache, ids)))
            plan.append((("scatter", n), self._jit_scatter, (self.kv_cache, ids, data)))
        return plan

    def _padded_empty(self, num_tokens: int, num_seqs: int, width: int) -> dict[str, np.ndarray]:
        b = build_ragged_batch([], self.page_size, pad_tokens=num_tokens, pad_seqs=num_seqs, pad_pages=width)
        return self._batch_arrays(b, self._sampling_arrays([], num_seqs))

    @staticmethod
    def _sampling_arrays(rows: Sequence[tuple[float, int, float, int, int]], num_seqs: int) -> dict:
        arr = np.zeros((num_seqs, 5), np.float64)
        arr[:, 2] = 1.0  # top_p of padding rows
        if rows:
            arr[: len(rows)] = np.asarray(rows, np.float64)
        return {
            "temperature": arr[:, 0].astype(np.float32),
            "top_k": arr[:, 1].astype(np.int32),
            "top_p": arr[:, 2].astype(np.float32),
            "seeds": arr[:, 3].astype(np.int32),
            "steps": arr[:, 4].astype(np.int32),
        }

    # ---- steps
    def run_step(
        self,
        chunks: Sequence[SequenceChunk],
        sampling_rows: Sequence[tuple[float, int, float, int, int]],
        previous: tuple[jax.Array, dict[int, int]] | None = None,
    ) -> jax.Array:
        """Compute `chunks` (one per sequence) and sample one token per sequence. Returns a device array
        [max_num_seqs] (row i belongs to chunk i); the caller decides when to read it.

        `previous = (tokens, {chunk: row})`: chunk's last token is row `row` of an earlier step's output, still
        on the device (its host copy is a placeholder)."""
        key, batch = self.step_batch(chunks, sampling_rows, None if previous is None else previous[1])
        return self.run_batch(key, batch, None if previous is None else previous[0])

    def step_batch(
        self,
        chunks: Sequence[SequenceChunk],
        sampling_rows: Sequence[tuple[float, int, float, int, int]],
        feeds: dict[int, int] | None = None,
    ) -> tuple[tuple, dict[str, np.ndarray]]:
        """The step's bucket key ("step", decode, n, width) and its padded host arrays (all but the previous
        step's tokens, which stay on the device)."""
        decode = all(len(c.token_ids) == 1 for c in chunks)
        width = self.buckets.page_bucket(max(len(c.pages) for c in chunks))
        num_tokens = sum(len(c.token_ids) for c in chunks)
        if decode:
            n = self.buckets.seq_bucket(len(chunks))
            b = build_ragged_batch(chunks, self.page_size, pad_tokens=n, pad_seqs=n, pad_pages=width)
            num_seqs = n
        else:
            n = self.buckets.token_bucket(num_tokens)
            if len(chunks) > self.max_num_seqs:
                raise CompileDuringServing(f"{len(chunks)} sequences exceed max_num_seqs {self.max_num_seqs}")
            b = build_ragged_batch(chunks, self.page_size, pad_tokens=n, pad_seqs=self.max_num_seqs, pad_pages=width)
            num_seqs = self.max_num_seqs
        feed_rows = None
        if feeds:
            feed_rows = np.full(len(b.tokens), -1, np.int32)
            for i, row in feeds.items():
                feed_rows[b.logits_indices[i]] = row  # the chunk's last token
        return ("step", decode, n, width), self._batch_arrays(b, self._sampling_arrays(sampling_rows, num_seqs),
                                                              feed_rows=feed_rows)  # fmt: skip

    def step_keys(self) -> list[tuple]:
        """Every step bucket ("step", decode, tokens or sequences, block-table width)."""
        sizes = ((True, self.buckets.seqs), (False, self.buckets.tokens))
        return [("step", decode, n, w) for w in self.buckets.pages for decode, ns in sizes for n in ns]

    def step_batch_template(self, key: tuple) -> dict[str, np.ndarray]:
        """An empty batch of bucket `key`'s shapes (what `step_batch` returns for that key)."""
        _, decode, n, width = key
        return self._padded_empty(n, n if decode else self.max_num_seqs, width)

    def run_batch(self, key: tuple, batch: dict[str, np.ndarray], previous_tokens: jax.Array | None) -> jax.Array:
        """Dispatch the step `step_batch` built; `previous_tokens`: the output its feed rows read."""
        batch = dict(batch, previous_tokens=self._no_previous if previous_tokens is None else previous_tokens)
        _, decode, _, _ = key
        exe = self._executable(key, self._jit_decode if decode else self._jit_mixed, self.params, self.kv_cache,
                               batch)  # fmt: skip
        tokens, self.kv_cache = exe(self.params, self.kv_cache, batch)
        return tokens

    # ---- page transfers
    def transfer_pieces(self, num_pages: int) -> list[int]:
        """Compiled transfer sizes that add up to exactly `num_pages` (its binary decomposition, largest first):
        a copy moves only the pages asked for, in at most log2(largest size) + 1 pieces, with no new compile."""
        return transfer_pieces(num_pages, self.buckets.transfer_pages)

    def _piece_slices(self, num_pages: int) -> list[slice]:
        """`transfer_pieces` as consecutive slices of the pages."""
        return transfer_slices(num_pages, self.buckets.transfer_pages)

    def gather_pages(self, page_ids: Sequence[int]) -> list[jax.Array]:
        """Device pages -> page-major device blocks [n_i, layers, 2, Hkv, S, D] whose pages, in order, are
        `page_ids` (`transfer_pieces`; dispatch only, no wait)."""
        blocks = []
        for piece in self._piece_slices(len(page_ids)):
            ids = np.asarray(page_ids[piece], np.int32)
            exe = self._executable(("gather", len(ids)), self._jit_gather, self.kv_cache, ids)
            blocks.append(exe(self.kv_cache, ids))
        return blocks

    def stage_pages(self, data: np.ndarray) -> list[jax.Array]:
        """Host pages [n, layers, 2, Hkv, S, D] -> device blocks, one per transfer piece: the host->device copy,
        which touches no runner state, so any thread may run it."""
        return [host_to_devices(data[piece], self._block_sharding) for piece in self._piece_slices(len(data))]

    def scatter_staged(self, page_ids: Sequence[int], blocks: Sequence[jax.Array]) -> None:
        """Write staged blocks (`stage_pages`, `HostKVTier.load`) into device pages `page_ids` (in place: the cache
        is donated)."""
        for piece, block in zip(self._piece_slices(len(page_ids)), blocks, strict=True):
            ids = np.asarray(page_ids[piece], np.int32)
            exe = self._executable(("scatter", len(ids)), self._jit_scatter, self.kv_cache, ids, block)
            self.kv_cache = exe(self.kv_cache, ids, block)

    def scatter_pages(self, page_ids: Sequence[int], data: np.ndarray) -> None:
        """Write host data [n, layers, 2, Hkv, S, D] into device pages, staging it on this thread."""
        self.scatter_staged(page_ids, self.stage_pages(data))

    def block_until_ready(self) -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(self.kv_cache)
        return time.perf_counter() - t0
