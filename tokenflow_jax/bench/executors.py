"""The executor a bench run replays its workload on: pool sizes from the flags or the workload, then the real
engine (`LLM`, on one device or split over `--tensor-parallel-size` of them) or the cost-model simulator."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

from tokenflow_jax.kv.pages import pages_for
from tokenflow_jax.scheduler.interface import Executor
from tokenflow_jax.workloads import RequestSpec

KV_FRACTION = 1 / 3  # default device pool: this share of the workload's total KV


def engine_limits(args: argparse.Namespace, specs: Sequence[RequestSpec]) -> dict[str, int]:
    """Pool sizes and model length, from the flags or derived from the workload."""
    longest = max(s.prompt_len + s.output_len for s in specs)
    max_model_len = args.max_model_len or max(128, 1 << math.ceil(math.log2(longest)))
    if longest > max_model_len:
        raise SystemExit(f"a request needs {longest} tokens > --max-model-len {max_model_len}")
    total = sum(pages_for(s.prompt_len + s.output_len, args.page_size) for s in specs)
    one = pages_for(longest, args.page_size)
    kv_pages = args.kv_pages or max(one, math.ceil(KV_FRACTION * total))
    if args.gpu_memory_utilization is not None:
        from checkpoints.presets import model_config
        from tokenflow_jax.engine.llm import device_kv_pages
        from tokenflow_jax.parallel import sharded_config

        if args.kv_pages:
            raise SystemExit("give --kv-pages or --gpu-memory-utilization, not both")
        try:
            cfg = sharded_config(model_config(args.model), args.tensor_parallel_size)
            kv_pages = device_kv_pages(args.gpu_memory_utilization, cfg, "float32", args.page_size,
                                       args.tensor_parallel_size)  # fmt: skip
        except ValueError as e:
            raise SystemExit(f"--gpu-memory-utilization: {e}") from e
    host = args.host_kv_pages if args.host_kv_pages is not None else total + kv_pages
    return dict(kv_pages=kv_pages, host_kv_pages=host, max_model_len=max_model_len, page_size=args.page_size,
                max_num_seqs=args.max_num_seqs, max_batch_tokens=args.max_batch_tokens)  # fmt: skip


def build_executor(args: argparse.Namespace, limits: dict[str, int]) -> tuple[Executor, frozenset[int]]:
    """(executor, EOS token ids); every page count is usable pages (each pool adds its null page)."""
    pools = dict(page_size=limits["page_size"], max_num_seqs=limits["max_num_seqs"],
                 max_batch_tokens=limits["max_batch_tokens"], max_model_len=limits["max_model_len"])  # fmt: skip
    if args.executor == "sim":
        from tokenflow_jax.sim.executor import SimExecutor

        try:
            ex = SimExecutor(args.sim_profile, args.tensor_parallel_size, num_device_pages=limits["kv_pages"],
                             num_host_pages=limits["host_kv_pages"], slowdown=args.sim_slowdown, **pools)  # fmt: skip
        except ValueError as e:  # a model the simulated GPUs cannot hold, heads N cannot split
            raise SystemExit(f"error: {e}") from e
        return ex, frozenset()
    from tokenflow_jax.engine.llm import LLM

    try:
        llm = LLM(args.model, scheduler="fcfs", kv_pages=limits["kv_pages"], host_kv_pages=limits["host_kv_pages"],
                  seed=args.seed, tensor_parallel_size=args.tensor_parallel_size, warmup=True, progress=args.progress,
                  **pools)  # fmt: skip
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    return llm.executor, frozenset(llm.tokenizer.eos_token_ids)
