"""`gpu_memory_utilization` sizes the device KV pool as vLLM's flag does: the pages that fit in that fraction
of the device's memory once the weights are in; a backend that reports no memory gets a clear error."""

from __future__ import annotations

import jax
import pytest

from checkpoints.presets import model_config
from tokenflow_jax.engine.llm import LLM, kv_pages_for_memory

GIB = 1 << 30


def test_pool_is_the_fraction_of_memory_less_the_weights() -> None:
    cfg = model_config("llama3-8b")
    weights = cfg.num_params * 2  # bfloat16
    page_bytes = 16 * 32 * 2 * 8 * 128 * 2  # tokens x layers x (K, V) x kv heads x head_dim x bytes: 2 MiB
    budget = 0.9 * 141 * GIB
    pages = kv_pages_for_memory(0.9, 141 * GIB, cfg, "bfloat16", page_size=16)
    # The usable pages plus the null page fill the budget to within one page.
    assert weights + (pages + 1) * page_bytes <= budget < weights + (pages + 2) * page_bytes
    assert kv_pages_for_memory(0.45, 141 * GIB, cfg, "bfloat16", page_size=16) < pages


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_fraction_outside_zero_to_one_is_refused(fraction: float) -> None:
    with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
        kv_pages_for_memory(fraction, 80 * GIB, model_config("llama3-8b"), "bfloat16", page_size=16)


def test_weights_that_take_the_whole_fraction_are_refused() -> None:
    with pytest.raises(ValueError, match="leaves no room for KV pages"):
        kv_pages_for_memory(0.5, 24 * GIB, model_config("qwen2.5-32b"), "bfloat16", page_size=16)


def test_kv_pages_and_utilization_together_are_refused() -> None:
    with pytest.raises(ValueError, match="not both"):
        LLM("tiny", kv_pages=32, gpu_memory_utilization=0.5, warmup=False)


def test_backend_without_memory_stats_says_so() -> None:
    if jax.devices()[0].memory_stats() is not None:
        pytest.skip(f"the {jax.default_backend()} backend reports its memory")
    with pytest.raises(ValueError, match="reports no device memory .* give kv_pages instead"):
        LLM("tiny", gpu_memory_utilization=0.5, warmup=False)


def test_bench_flag_sizes_the_pool_from_device_memory_or_says_why_not() -> None:
    from tokenflow_jax.bench import schedulers as bench

    args = bench.build_parser().parse_args(["--gpu-memory-utilization", "0.5", "--kv-pages", "8"])
    with pytest.raises(SystemExit, match="not both"):
        bench.engine_limits(args, bench.workload_specs(args))
    args = bench.build_parser().parse_args(["--gpu-memory-utilization", "0.5"])
    if jax.devices()[0].memory_stats() is None:
        with pytest.raises(SystemExit, match="reports no device memory"):
            bench.engine_limits(args, bench.workload_specs(args))
    else:
        assert bench.engine_limits(args, bench.workload_specs(args))["kv_pages"] > 0
