"""Where the host KV tier's pages live: one JAX array in pinned host memory, or a numpy array.

Both hold pages `[num_pages, layers, 2, Hkv, page_size, head_dim]` (page-major, as the transfer blocks) and move
them the same way: `write` puts a gathered device block into host rows, `to_device` turns host rows into one
device block. The pinned pool is sharded like the blocks, so each device's kv heads live in its own pinned
memory and a copy each way is one DMA per device. JAX arrays are immutable, so it is updated in place by donated
jitted scatters computed on the host (`compute_on("device_host")`) and read by jitted host gathers of exactly
the rows asked for. Writes (kv-write-through) and reads (kv-load) run on different threads: the pool's current
array is swapped under a lock, and a gather is dispatched under the same lock, so none reads a donated buffer
(JAX runs the gather before the scatter that donates what it reads).

`host_memory` chooses one at start-up (docs/DESIGN.md section 4): pinned where a tiny round trip through it
matches numpy, numpy on the CPU backend (its pinned memory is plain host memory, allocated whole), across
processes and where the round trip fails (`kv.host_tier` falls back to numpy too where the whole pinned pool
cannot be allocated). `TOKENFLOW_HOST_KV_MEMORY=numpy|pinned_host` forces either.
"""

from __future__ import annotations

import functools
import inspect
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.compute_on import compute_on
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tokenflow_jax.parallel import BLOCK_SPEC, host_to_devices

HOST_KV_MEMORY_ENV = "TOKENFLOW_HOST_KV_MEMORY"
HOST_MEMORY_KINDS = ("auto", "pinned_host", "numpy")
ASKED = "asked for"  # why a memory kind was chosen when it was forced


def _distinct_head_slices(block: jax.Array) -> list[Any]:
    """The block's addressable shards, one per kv-head slice (one copy of a replicated slice is enough)."""
    shards, seen = [], set()
    for shard in block.addressable_shards:
        heads = shard.index[3]
        if (heads.start, heads.stop) not in seen:
            seen.add((heads.start, heads.stop))
            shards.append(shard)
    return shards


class NumpyHostPages:
    """Pages in a numpy array: lazily mapped (untouched pages cost no memory); rows are written with numpy.
    Across processes each process fills its own devices' kv-head slices (the rest is never touched)."""

    memory_kind = "numpy"

    def __init__(self, shape: tuple[int, ...], dtype: Any, mesh: Mesh) -> None:
        self.pages = np.zeros(shape, dtype=np.dtype(jnp.dtype(dtype)))

    def write(self, rows: Sequence[int], block: jax.Array) -> int:
        """Copy `block`'s pages into `rows`; returns the pages moved (per kv-head slice)."""
        shards = _distinct_head_slices(block)
        for shard in shards:
            self.pages[list(rows), :, :, shard.index[3]] = np.asarray(shard.data)
        return len(rows) * len(shards)

    def host_pages(self, rows: Sequence[int]) -> np.ndarray:
        return self.pages[list(rows)]

    def to_device(self, rows: Sequence[int], sharding: NamedSharding) -> jax.Array:
        """Rows -> one device block: a numpy gather, then each device receives its slice."""
        return host_to_devices(self.pages[list(rows)], sharding)

    def compile(self, sizes: Sequence[int]) -> None:
        """Nothing to compile."""


def _bits(dtype: Any) -> Any:
    """The unsigned int type of `dtype`'s width: what the pinned pool stores."""
    return {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[jnp.dtype(dtype).itemsize]


def _on_host(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """`fn` as a host computation whose result stays in host memory: a context manager up to jax 0.10, a
    function transform that names the outputs' memory from jax 0.11."""
    if "out_memory_spaces" in inspect.signature(compute_on).parameters:
        return compute_on(fn, compute_type="device_host", out_memory_spaces=jax.memory.Space.Host)

    @functools.wraps(fn)
    def on_host(*args: Any) -> jax.Array:
        with compute_on("device_host"):
            return fn(*args)

    return on_host


def _scatter_rows(pool: jax.Array, rows: jax.Array, block: jax.Array) -> jax.Array:
    def scatter(pool: jax.Array, rows: jax.Array, block: jax.Array) -> jax.Array:
        return pool.at[rows].set(jax.lax.bitcast_convert_type(block, pool.dtype))

    return _on_host(scatter)(pool, rows, block)


def _gather_rows(pool: jax.Array, rows: jax.Array, *, dtype: Any) -> jax.Array:
    def gather(pool: jax.Array, rows: jax.Array) -> jax.Array:
        return jax.lax.bitcast_convert_type(pool[rows], dtype)

    return _on_host(gather)(pool, rows)


class PinnedHostPages:
    """Pages in one JAX array in `pinned_host` memory, sharded like the transfer blocks. It holds the raw bits
    (unsigned ints of the KV dtype's width): XLA's CPU scatter of bfloat16 ran ~20x slower than of uint16.
    Allocated whole, at once."""

    memory_kind = "pinned_host"

    def __init__(self, shape: tuple[int, ...], dtype: Any, mesh: Mesh) -> None:
        self.dtype = jnp.dtype(dtype)
        self._sharding = NamedSharding(mesh, BLOCK_SPEC, memory_kind="pinned_host")
        self._rows_sharding = NamedSharding(mesh, P(), memory_kind="pinned_host")
        bits = _bits(dtype)
        self._pool = jax.jit(lambda: jnp.zeros(shape, bits), out_shardings=self._sharding)()
        self._lock = threading.Lock()  # guards `_pool`: a write donates it
        self._scatter = jax.jit(_scatter_rows, donate_argnums=0, out_shardings=self._sharding)
        self._gather = jax.jit(functools.partial(_gather_rows, dtype=self.dtype), out_shardings=self._sharding)
        self._executables: dict[tuple[str, int], Any] = {}
        self._compile_lock = threading.Lock()

    def compile_plan(self, sizes: Sequence[int]) -> list[tuple[tuple[str, int], Any, tuple]]:
        """(key, jitted function, abstract arguments) of the scatter and the gather of each size in `sizes`: what
        `compile` compiles (also what a cross-platform lowering check walks)."""
        pool = jax.ShapeDtypeStruct(self._pool.shape, self._pool.dtype, sharding=self._sharding)
        plan = []
        for n in sizes:
            rows = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=self._rows_sharding)
            block = jax.ShapeDtypeStruct((n, *self._pool.shape[1:]), self.dtype, sharding=self._sharding)
            plan += [(("scatter", n), self._scatter, (pool, rows, block)), (("gather", n), self._gather, (pool, rows))]
        return plan

    def _executable(self, op: str, n: int) -> Any:
        """The scatter or gather of `n` rows, compiled once (`compile` does it ahead of serving)."""
        key = (op, n)
        if key not in self._executables:
            with self._compile_lock:  # the write and load threads may both meet a new size
                for k, fn, args in self.compile_plan([n]):
                    if k == key and k not in self._executables:
                        self._executables[k] = fn.lower(*args).compile()
        return self._executables[key]

    def compile(self, sizes: Sequence[int]) -> None:
        """Compile the scatter and the gather of every size in `sizes` (the tier's transfer sizes)."""
        for (op, n), _, _ in self.compile_plan(sizes):
            self._executable(op, n)

    def _rows(self, rows: Sequence[int]) -> jax.Array:
        # A host computation's operands must all be in host memory, the row ids too.
        return jax.device_put(np.asarray(rows, np.int32), self._rows_sharding)

    def write(self, rows: Sequence[int], block: jax.Array) -> int:
        """Copy `block`'s pages into `rows` (one device->pinned transfer, then the in-place scatter); returns the
        pages moved (per kv-head slice), once they have landed."""
        staged = jax.device_put(block, self._sharding)
        scatter, ids = self._executable("scatter", len(rows)), self._rows(rows)
        with self._lock:
            self._pool = pool = scatter(self._pool, ids, staged)
        pool.block_until_ready()
        return len(rows) * len(_distinct_head_slices(block))

    def _gathered(self, rows: Sequence[int]) -> jax.Array:
        gather, ids = self._executable("gather", len(rows)), self._rows(rows)
        with self._lock:  # dispatched before any later scatter can donate the pool it reads
            return gather(self._pool, ids)

    def to_device(self, rows: Sequence[int], sharding: NamedSharding) -> jax.Array:
        """Rows -> one device block: a host gather of exactly those rows, then one pinned->device transfer."""
        return jax.device_put(self._gathered(rows), sharding)

    def host_pages(self, rows: Sequence[int]) -> np.ndarray:
        return np.array(self._gathered(rows))


HostPages = NumpyHostPages | PinnedHostPages


@functools.cache
def pinned_unavailable(mesh: Mesh) -> str | None:
    """Why a pinned pool cannot serve this mesh (None: it can), checked once per mesh: a tiny scatter and
    gather round trip through pinned host memory on its devices, compared with numpy."""
    if jax.process_count() > 1:
        return "the mesh spans processes (each process fills only its own devices' slices of the host pages)"
    kinds = {m.kind for d in mesh.devices.flat for m in d.addressable_memories()}
    if "pinned_host" not in kinds:
        return f"the {mesh.devices.flat[0].platform} backend has no pinned_host memory"
    shape = (4, 1, 2, mesh.size, 2, 8)
    try:
        pool = PinnedHostPages(shape, jnp.bfloat16, mesh)
        block = np.random.default_rng(0).standard_normal((2, *shape[1:])).astype(jnp.bfloat16)
        pool.write([3, 1], host_to_devices(block, NamedSharding(mesh, BLOCK_SPEC)))
        back = np.asarray(pool.to_device([1, 3], NamedSharding(mesh, BLOCK_SPEC)))
        if not np.array_equal(back, block[::-1]) or pool.host_pages([0]).any():
            return "a round trip through pinned_host memory came back changed"
    except Exception as e:  # noqa: BLE001 - any failure means: not on this backend
        return f"a round trip through pinned_host memory failed ({failure(e)})"
    return None


def failure(e: BaseException) -> str:
    """An exception in one line, for a log: its type and its message's first line."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def host_memory(mesh: Mesh, requested: str | None = None) -> tuple[str, str]:
    """(memory kind, why): "pinned_host" or "numpy" for the host pages on `mesh`. `requested` (default: the
    TOKENFLOW_HOST_KV_MEMORY environment variable, else "auto") forces one; "pinned_host" where it cannot
    work is a ValueError naming why."""
    requested = requested or os.environ.get(HOST_KV_MEMORY_ENV) or "auto"
    if requested not in HOST_MEMORY_KINDS:
        raise ValueError(f"host KV memory {requested!r}: expected one of {', '.join(HOST_MEMORY_KINDS)} "
                         f"(argument or {HOST_KV_MEMORY_ENV})")  # fmt: skip
    if requested == "numpy":
        return "numpy", ASKED
    if requested == "auto" and mesh.devices.flat[0].platform == "cpu":
        return "numpy", "on the CPU backend pinned_host is plain host memory, allocated whole"
    why_not = pinned_unavailable(mesh)
    if requested == "pinned_host":
        if why_not:
            raise ValueError(f"pinned_host host KV memory was asked for, but {why_not}")
        return "pinned_host", ASKED
    if why_not:
        return "numpy", why_not
    return "pinned_host", "a round trip through it matched"


POOLS: dict[str, Callable[..., HostPages]] = {"numpy": NumpyHostPages, "pinned_host": PinnedHostPages}
