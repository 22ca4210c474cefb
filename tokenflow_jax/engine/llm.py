"""`LLM`: the public Python face. Builds the model, the executor and a policy; runs requests to completion."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
from collections.abc import Sequence
from types import EllipsisType
from typing import Any

import jax

from checkpoints import load_model, resolve_dtype
from checkpoints.presets import model_config
from tokenflow_jax import distributed
from tokenflow_jax.config import ModelConfig
from tokenflow_jax.engine.core import EngineCore
from tokenflow_jax.engine.detokenize import token_text
from tokenflow_jax.engine.executor import EngineExecutor
from tokenflow_jax.engine.multihost import follow
from tokenflow_jax.kv.pages import default_host_pages, pages_for, pool_pages
from tokenflow_jax.metrics import RequestMetrics, request_metrics
from tokenflow_jax.parallel import (
    kv_head_replicas,
    make_mesh,
    replicate_kv_heads,
    sharded_config,
    weight_bytes_per_device,
)
from tokenflow_jax.request import Request, stream_rate
from tokenflow_jax.sampling_params import SamplingParams
from tokenflow_jax.scheduler.registry import make_policy
from tokenflow_jax.tokenizer import IncrementalDetokenizer

DEFAULT_RATE = 20.0  # tokens/s a reader consumes when a request does not say (None: such requests are rate-less)


@dataclasses.dataclass
class Output:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    metrics: RequestMetrics | None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (device or host tier)


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache, on by default (TOKENFLOW_JAX_CACHE_DIR='' turns it off)."""
    path = os.environ.get("TOKENFLOW_JAX_CACHE_DIR", os.path.expanduser("~/.cache/tokenflow_jax/xla"))
    if path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def device_memory_bytes() -> int | None:
    """Bytes free on the default device: its allocator's limit less what is in use on an accelerator, the
    available RAM on the CPU; None when unknown."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def device_memory_limit() -> int | None:
    """Bytes JAX's allocator may use on the default device (`memory_stats()["bytes_limit"]`: on a GPU, by
    default 75% of its memory, XLA_PYTHON_CLIENT_MEM_FRACTION sets it); None where the backend reports no memory
    stats (JAX's CPU backend)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return int(stats["bytes_limit"]) if "bytes_limit" in stats else None


def kv_pages_for_memory(
    fraction: float, memory_bytes: int, cfg: ModelConfig, dtype: Any, page_size: int, tensor_parallel_size: int = 1
) -> int:
    """Usable device KV pages when the engine may take `fraction` of `memory_bytes` on each of its devices,
    weights included (as vLLM's --gpu-memory-utilization sizes its pool); the rest of the memory is the steps'
    working space. Under tensor parallelism (`cfg` as sharded) a device holds its slice of weights and pages."""
    if not 0 < fraction <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {fraction}")
    itemsize = resolve_dtype(dtype).itemsize
    weights = weight_bytes_per_device(cfg, tensor_parallel_size, itemsize)
    page_bytes = page_size * cfg.kv_bytes_per_token * itemsize // tensor_parallel_size
    pages = (int(fraction * memory_bytes) - weights) // page_bytes - 1  # the null page comes on top
    if pages < 1:
        raise ValueError(
            f"gpu_memory_utilization {fraction} of {memory_bytes:,} bytes leaves no room for KV pages after "
            f"{weights:,} bytes of {resolve_dtype(dtype).name} weights; raise it or use a smaller model or dtype"
        )
    return pages


def device_kv_pages(
    fraction: float, cfg: ModelConfig, dtype: Any, page_size: int, tensor_parallel_size: int = 1
) -> int:
    """`kv_pages_for_memory` over the default device's memory; ValueError where the backend reports none."""
    memory = device_memory_limit()
    if memory is None:
        raise ValueError(
            f"the {jax.default_backend()} backend reports no device memory (jax's Device.memory_stats() is None), "
            "so gpu_memory_utilization cannot size the KV pool; give kv_pages instead"
        )
    return kv_pages_for_memory(fraction, memory, cfg, dtype, page_size, tensor_parallel_size)


def check_fits(
    model: str, cfg: ModelConfig, dtype: Any, kv_pages: int, host_kv_pages: int, page_size: int,
    tensor_parallel_size: int = 1,
) -> None:  # fmt: skip
    """ValueError naming the bytes the weights and KV pages need and the bytes the device has, before anything
    is allocated: per device under tensor parallelism (`cfg` as sharded); on the CPU every device and the host
    tier share the same memory."""
    itemsize = resolve_dtype(dtype).itemsize
    tp = tensor_parallel_size
    page_bytes = page_size * cfg.kv_bytes_per_token * itemsize
    weights = weight_bytes_per_device(cfg, tp, itemsize)
    kv = pool_pages(kv_pages) * page_bytes // tp
    on_cpu = jax.default_backend() == "cpu"
    if on_cpu:
        weights, kv = weights * tp, kv * tp
    host = pool_pages(host_kv_pages) * page_bytes if on_cpu and host_kv_pages else 0
    have = device_memory_bytes()
    if have is not None and weights + kv + host > have:
        each = f" on each of {tp} devices" if tp > 1 and not on_cpu else ""
        parts = f"{weights:,} bytes of {resolve_dtype(dtype).name} weights + {kv:,} bytes of device KV pages{each}"
        parts += f" + {host:,} bytes of host KV pages" if host else ""
        raise ValueError(
            f"model {model!r} does not fit: it needs {weights + kv + host:,} bytes ({parts}), and the "
            f"{jax.devices()[0].platform} device has {have:,} bytes free; use a smaller dtype, fewer KV pages "
            "(kv_pages, host_kv_pages, max_num_seqs, max_model_len), a smaller model, or more devices "
            "(tensor_parallel_size)"
        )


def _loading_device(tensor_parallel_size: int) -> Any:
    """Where weights are read before each device takes its slice: host memory when they are split over
    accelerators (the whole model may not fit one), else the default device."""
    if tensor_parallel_size > 1 and jax.default_backend() != "cpu":
        return jax.default_device(jax.local_devices(backend="cpu")[0])
    return contextlib.nullcontext()


def default_attention() -> str:
    # Interpret-mode Pallas is too slow to serve on CPU; plain XLA (`tokenflow_jax.attention`) is the CPU path.
    return "pallas" if jax.default_backend() == "gpu" else "xla"


class LLM:
    """Offline and streaming generation over one model.

    `LLM("tiny").generate(["Hello"], SamplingParams(max_tokens=8))` -> list[Output]. `kv_pages` and
    `host_kv_pages` count usable pages of each tier (default: `max_num_seqs` full sequences; and
    `kv.pages.default_host_pages`: twice that, or 4 GiB if more, at most a quarter of host memory);
    `gpu_memory_utilization` instead sizes the device pool as vLLM does, as the pages that fit in that fraction of
    the device's memory less the weights
    (`kv_pages_for_memory`). A request's reader rate is `rates[i]` in `generate` (None: the request states no
    rate and is served at what the streams leave spare), else `default_rate` (None: rate-less too). EOS and
    sampling defaults are the
    checkpoint's (`self.generation`, see `checkpoints.generation`); a model whose weights and KV pages exceed the
    device's free memory is refused before anything is allocated. `tensor_parallel_size` N splits the model over
    N devices (`devices`, default the first N of `jax.devices()`; `tokenflow_jax.parallel`).

    Across processes (after `tokenflow_jax.distributed.initialize`), every process builds the same `LLM` over
    every process's devices; process 0 leads (`generate`, a server) and the others `follow()` it
    (`tokenflow_jax.engine.multihost`).
    """

    def __init__(
        self,
        model: str = "tiny",
        *,
        scheduler: str = "tokenflow",
        kv_pages: int | None = None,
        host_kv_pages: int | None = None,
        preemption: str = "auto",
        seed: int = 0,
        dtype: str = "float32",
        page_size: int = 16,
        max_num_seqs: int = 32,
        max_batch_tokens: int = 256,
        max_model_len: int | None = None,
        gpu_memory_utilization: float | None = None,
        attention: str | None = None,
        default_rate: float | None = DEFAULT_RATE,
        scheduler_config: dict[str, Any] | None = None,
        enable_prefix_caching: bool = True,
        tensor_parallel_size: int = 1,
        devices: Sequence[jax.Device] | None = None,
        warmup: bool = True,
        progress: bool = False,
    ) -> None:
        default_rate = stream_rate(default_rate)
        enable_compilation_cache()
        model_cfg = model_config(model)
        kv_replicas = kv_head_replicas(model_cfg, tensor_parallel_size)
        if distributed.is_multi_process() and (devices is not None or tensor_parallel_size != jax.device_count()):
            raise ValueError(
                f"tensor_parallel_size {tensor_parallel_size} across {jax.process_count()} processes: the engine "
                f"splits the model over every process's devices, so tensor_parallel_size must be "
                f"{jax.device_count()} ({jax.local_device_count()} on each) and devices unset"
            )
        mesh = make_mesh(tensor_parallel_size, devices)
        cfg = sharded_config(model_cfg, tensor_parallel_size)  # the page pool's kv heads
        max_model_len = max_model_len or min(cfg.max_context, 2048)
        if max_model_len > cfg.max_context:
            limits = f"max_position_embeddings {cfg.max_position_embeddings}, sliding_window {cfg.sliding_window}"
            raise ValueError(
                f"max_model_len {max_model_len} is past {model!r}'s context of {cfg.max_context} tokens ({limits}); "
                "longer contexts (dynamic rope rescaling, sliding-window attention) are not implemented"
            )
        pages_per_seq = pages_for(max_model_len, page_size)
        if gpu_memory_utilization is not None:
            if kv_pages is not None:
                raise ValueError("give kv_pages or gpu_memory_utilization, not both")
            kv_pages = device_kv_pages(gpu_memory_utilization, cfg, dtype, page_size, tensor_parallel_size)
        if kv_pages is None:
            kv_pages = max_num_seqs * pages_per_seq
        if host_kv_pages is None:
            page_bytes = cfg.kv_bytes_per_token * resolve_dtype(dtype).itemsize * page_size
            host_kv_pages = default_host_pages(kv_pages, page_bytes)
        check_fits(model, cfg, dtype, kv_pages, host_kv_pages, page_size, tensor_parallel_size)
        if distributed.is_multi_process():
            distributed.check_same_engine(dict(
                model=model, dtype=dtype, seed=seed, kv_pages=kv_pages, host_kv_pages=host_kv_pages,
                page_size=page_size, max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens,
                max_model_len=max_model_len, attention=attention, tensor_parallel_size=tensor_parallel_size,
            ))  # fmt: skip
        self.is_leader = distributed.is_leader()
        with _loading_device(tensor_parallel_size):
            loaded = load_model(model, dtype=dtype, seed=seed)
            params = replicate_kv_heads(loaded.params, loaded.cfg, kv_replicas)
        self.cfg, self.tokenizer, self.generation = loaded.cfg, loaded.tokenizer, loaded.generation
        self.tensor_parallel_size = tensor_parallel_size
        self.model_name = model
        self.seed = seed
        self.default_rate = default_rate
        self.executor = EngineExecutor(
            cfg, params, mesh=mesh, num_device_pages=kv_pages, num_host_pages=host_kv_pages,
            page_size=page_size, max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens,
            max_model_len=max_model_len, kv_dtype=dtype, attention_impl=attention or default_attention(),
            prefix_caching=enable_prefix_caching, cache_salt=f"{model}|{dtype}|seed={seed}",
        )  # fmt: skip
        if warmup and self.is_leader:  # a follower compiles when the leader's warm-up reaches it
            self.executor.warmup(progress=progress)
        self.core = EngineCore(
            self.executor,
            make_policy(scheduler, **(scheduler_config or {})),
            eos_token_ids=self.generation.eos_token_ids,
            preemption=preemption,
        )
        # Numbers new requests (default ids and seeds); data-parallel replicas share one, so theirs differ too.
        self.request_numbers = itertools.count()

    def follow(self) -> None:
        """On a process other than 0: carry out the leader's device operations until it closes, then close."""
        if self.is_leader:
            raise RuntimeError("process 0 leads: it runs generate or a server, the other processes follow it")
        follow(self.executor.runner, self.executor.host)
        self.close()

    def _check_leader(self) -> None:
        if not self.is_leader:
            raise RuntimeError(f"process {jax.process_index()} follows process 0: call follow(), not generate")

    # ---- building requests
    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise ValueError(f"token ids out of range [0, {self.cfg.vocab_size}): {bad[:5]}")
        if not ids:
            raise ValueError("prompt is empty")
        return ids

    def make_request(
        self,
        prompt: str | Sequence[int],
        sampling: SamplingParams,
        *,
        rate: float | None | EllipsisType = ...,
        request_id: str | None = None,
        arrival: float | None = None,
    ) -> Request:
        """`rate`: tokens/s its reader consumes, None for a rate-less request, ... (the default) `default_rate`."""
        rate = stream_rate(self.default_rate if rate is ... else rate)
        n = next(self.request_numbers)
        seed = sampling.seed if sampling.seed is not None else (self.seed * 1_000_003 + n)
        return Request(
            request_id=request_id or f"req-{n}",
            prompt_ids=self.encode_prompt(prompt),
            sampling=sampling,
            rate=rate,
            arrival=self.executor.now() if arrival is None else arrival,
            seed=seed % (2**31 - 1),
        )

    # ---- offline generation
    def generate(
        self,
        prompts: str | Sequence[str | Sequence[int]],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        rates: Sequence[float | None] | None = None,
    ) -> list[Output]:
        """Run the prompts to completion. `rates[i]`: prompt i's reader rate in tokens/s, or None when it states
        no rate (rate-less); without `rates`, every request gets `default_rate`."""
        self._check_leader()
        if isinstance(prompts, str):
            prompts = [prompts]
        if sampling is None:
            sampling = self.generation.sampling_params()  # the checkpoint's sampling defaults
        samplings = sampling if isinstance(sampling, Sequence) else [sampling] * len(prompts)
        if len(samplings) != len(prompts) or (rates is not None and len(rates) != len(prompts)):
            raise ValueError("prompts, sampling and rates must have the same length")
        reqs = [
            self.make_request(p, s, rate=... if rates is None else rates[i])
            for i, (p, s) in enumerate(zip(prompts, samplings, strict=True))
        ]
        detoks = {r.request_id: IncrementalDetokenizer(self.tokenizer, r.sampling.stop, r.prompt_ids) for r in reqs}
        texts = {r.request_id: [] for r in reqs}
        for r in reqs:
            self.core.add_request(r)
        while any(self.core.is_live(r.request_id) for r in reqs):
            for ev in self.core.step():
                texts[ev.request_id].append(token_text(self.core, ev, detoks[ev.request_id])[0])
        return [self._output(r, "".join(texts[r.request_id])) for r in reqs]

    def _output(self, req: Request, text: str) -> Output:
        record = self.core.records.get(req.request_id)
        return Output(
            request_id=req.request_id,
            prompt_token_ids=list(req.prompt_ids),
            token_ids=list(req.output_ids),
            text=text,
            finish_reason=req.finish_reason,
            metrics=request_metrics(record) if record is not None and record.token_times else None,
            num_cached_tokens=max(req.num_cached_tokens, 0),
        )

    def close(self) -> None:
        self.executor.close()
