"""Tensor parallelism in the simulator's cost profiles: one GPU as before, N GPUs against hand roofline figures,
memory per GPU, and the errors for models that do not fit or cannot be split."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tokenflow_jax import workloads
from tokenflow_jax.bench import faithful
from tokenflow_jax.config import PRESETS
from tokenflow_jax.engine.core import EngineCore
from tokenflow_jax.scheduler.registry import make_policy
from tokenflow_jax.sim.executor import SimExecutor
from tokenflow_jax.sim.profiles import builtin_profile
from tokenflow_jax.sim.replay import replay
from tokenflow_jax.sim.tensor_parallel import sharding

GIB = 1 << 30
NVLINK = (450e9, 2e-6)  # NVLink 4: bytes/s one way per GPU, seconds per hop
PCIE = (25e9, 15e-6)  # PCIe 4.0 x16, effective; a hop through host memory


def test_one_gpu_costs_what_it_cost_before_tensor_parallelism() -> None:
    # (step of 64 decodes at 1k context, step of a 512-token prefill, device pages, host pages, d2h bytes/s),
    # as the profiles gave them before tensor parallelism existed (step times to 1e-6: the least-squares fits
    # behind them move by up to ~3e-9 with the numpy and BLAS build).
    before = {
        "h100-llama3-8b": (0.024834376068207372, 0.024655301789180822, 29206, 116824, 53362646310.43257),
        "h200-qwen2.5-32b-roofline": (0.017137281377295272, 0.028183939106444234, 14632, 58531, 53362646310.43257),
        "rtx4090-llama3-8b": (0.08422817571587837, 0.09631869529062685, 3401, 13604, 25e9),
    }
    for name, (decode, prefill, device, host, d2h) in before.items():
        for p in (builtin_profile(name), builtin_profile(f"{name}-tp1")):
            assert p.step_time(64, 64 * 1024) == pytest.approx(decode, rel=1e-6)
            assert p.step_time(512, 512, 512, 512 * 256) == pytest.approx(prefill, rel=1e-6)
            assert (p.device_pages(16), p.host_pages(16), p.d2h_bytes_per_s) == (device, host, d2h)
            assert p.h2d_latency_s == pytest.approx(0.000428571, rel=1e-5)
    qwen = next(s for s in faithful.faithful_setups() if "qwen2.5-32b mem-frac 0.83 burst 400" in s.name)
    p = qwen.sim_profile("naive")
    assert p.step_time(64, 64 * 1024) == pytest.approx(0.05902460155731692, rel=1e-6) and p.device_pages(16) == 12279


def _weight_bytes(vocab: int, d: int, ffn: int, layers: int, heads: int, kv: int, hd: int) -> int:
    """bf16 bytes of a Llama-shaped model (untied embeddings and LM head, q/k/v/o and gate/up/down per layer)."""
    per_layer = np.array([d * heads * hd, d * kv * hd, d * kv * hd, heads * hd * d, d * ffn, d * ffn, ffn * d])
    return int(2 * (2 * vocab * d + layers * per_layer.sum()))


def _ring_all_reduce_s(nbytes: float, n: int, link_bytes_per_s: float, hop_s: float) -> float:
    # Reduce-scatter then all-gather: n - 1 steps each, each moving nbytes / n over one link.
    steps = 2 * (n - 1)
    return steps * (nbytes / n / link_bytes_per_s + hop_s)


@pytest.mark.parametrize(
    ("name", "shape", "hbm", "link"),
    [
        ("h100-llama3-70b-roofline-tp4", (128256, 8192, 28672, 80, 64, 8, 128), 3.35e12, NVLINK),
        ("rtx4090-qwen2.5-32b-roofline-tp4", (152064, 5120, 27648, 64, 40, 8, 128), 1.0e12, PCIE),
        ("h200-llama3-8b-roofline-tp2", (128256, 4096, 14336, 32, 32, 8, 128), 1.43 * 3.35e12, NVLINK),
    ],
)  # fmt: skip
def test_a_decode_step_on_n_gpus_costs_its_hbm_roofline_plus_two_all_reduces_per_layer(name, shape, hbm, link) -> None:
    n = int(name.rsplit("-tp", 1)[1])
    vocab, d, ffn, layers, heads, kv, hd = shape
    profile = builtin_profile(name)
    for batch, context in [(64, 1024), (256, 1024), (32, 4096)]:
        # Every GPU reads its quarter (half) of the weights and of the batch's K and V once ...
        kv_bytes = batch * context * 2 * layers * kv * hd * 2
        memory_s = (_weight_bytes(vocab, d, ffn, layers, heads, kv, hd) + kv_bytes) / n / hbm
        # ... and all GPUs all-reduce the batch's activations after attention and after the MLP in every layer.
        exchange_s = 2 * layers * _ring_all_reduce_s(batch * d * 2, n, *link)
        assert profile.step_time(batch, batch * context) == pytest.approx(memory_s + exchange_s, rel=0.03)
        assert exchange_s > 0.05 * (memory_s + exchange_s)  # more than the tolerance: a missing one would show


def test_compute_divides_over_the_gpus_and_page_copies_run_in_parallel() -> None:
    one, two = builtin_profile("h100-llama3-8b"), builtin_profile("h100-llama3-8b-tp2")
    for tokens in (512, 8192):  # one prefill of that many tokens
        args = (tokens, tokens, tokens, tokens * tokens / 2)
        exchange_s = 2 * 32 * _ring_all_reduce_s(tokens * 4096 * 2, 2, *NVLINK)
        assert two.step_time(*args) == pytest.approx(one.step_time(*args) / 2 + exchange_s, rel=1e-9)
    # Each GPU copies its half of every page over its own PCIe link, at the same time as the other.
    assert (two.d2h_bytes_per_s, two.h2d_bytes_per_s) == (2 * one.d2h_bytes_per_s, 2 * one.h2d_bytes_per_s)
    assert two.page_bytes(16) == one.page_bytes(16) == 2 << 20  # a page still holds every kv head's K and V
    one_est, two_est = SimExecutor(one).estimates(), SimExecutor(two).estimates()  # what the policies weigh
    # (A page's copy time halves; the latency of each copy does not.)
    page_out_s, page_in_s = (2 << 20) / one.d2h_bytes_per_s, (2 << 20) / one.h2d_bytes_per_s
    assert one_est.swap_out_per_page_s - two_est.swap_out_per_page_s == pytest.approx(page_out_s / 2)
    assert one_est.swap_in_per_page_s - two_est.swap_in_per_page_s == pytest.approx(page_in_s / 2)


def test_each_gpu_holds_its_share_of_the_weights_and_of_every_page() -> None:
    weights = _weight_bytes(128256, 8192, 28672, 80, 64, 8, 128)
    page = 16 * 2 * 80 * 8 * 128 * 2  # 16 tokens of K and V, all layers and kv heads: 5 MiB
    assert 141.0e9 < weights < 141.2e9 and page == 5 << 20
    for n in (2, 4, 8):
        kv_per_gpu = 0.9 * 80 * GIB - weights / n
        p = builtin_profile(f"h100-llama3-70b-tp{n}")
        assert p.device_pages(16) == pytest.approx(kv_per_gpu / (page / n), abs=1)  # 1/n of each page per GPU
        assert p.host_pages(16) == pytest.approx(4 * p.device_pages(16), abs=4)
    assert 2500 < builtin_profile("h100-llama3-70b-tp2").device_pages(16) < 2700  # ~41k tokens: barely fits
    # More GPUs than kv heads (16 > 8, Llama-3-8B): each keeps one kv head, replicated twice, as vLLM does; its
    # k/v projections are replicated with it, and each page copy moves one eighth of the page per GPU.
    shard = sharding(PRESETS["llama3-8b"], 16)
    assert (shard.kv_heads_per_device, shard.kv_share) == (1, 1 / 8)
    llama = _weight_bytes(128256, 4096, 14336, 32, 32, 8, 128)
    kv_proj = 2 * 32 * 2 * 4096 * 8 * 128
    per_gpu = (llama - kv_proj) / 16 + kv_proj / 8
    p16 = builtin_profile("h200-llama3-8b-tp16")
    assert p16.device_pages(16) == pytest.approx((0.9 * 141e9 - per_gpu) / (2 * 1024 * 1024 / 8), abs=1)
    assert p16.d2h_bytes_per_s == pytest.approx(8 * builtin_profile("h200-llama3-8b").d2h_bytes_per_s)


def test_a_model_one_gpu_cannot_hold_fails_clearly_and_runs_on_more() -> None:
    with pytest.raises(ValueError, match=r"weights \(141.1 GB\) leave no room for KV .* larger tensor parallel size"):
        builtin_profile("h100-llama3-70b")
    with pytest.raises(ValueError, match=r"65.5 GB, 32.8 GB on each of 2 GPUs\) leave no room for KV"):
        builtin_profile("rtx4090-qwen2.5-32b-tp2")
    with pytest.raises(ValueError, match="no room for KV in 0.3 of a 141.0 GB GPU"):
        builtin_profile("h200-qwen2.5-32b", gpu_memory_utilization=0.3)
    assert builtin_profile("h200-qwen2.5-32b-tp2", gpu_memory_utilization=0.3).device_pages(16) > 0
    executor = SimExecutor("h100-llama3-70b", tensor_parallel_size=2)
    assert executor.profile == builtin_profile("h100-llama3-70b-tp2")
    with pytest.raises(ValueError, match="tensor parallel size 2 needs a built-in profile"):
        SimExecutor(builtin_profile("h100-llama3-8b"), tensor_parallel_size=2)  # a profile knows no model to split
    specs = workloads.burst(8, prompt=workloads.LengthDist(256, 32), output=workloads.LengthDist(64, 8), seed=3)
    records = replay(EngineCore(executor, make_policy("tokenflow")), specs, progress=False)
    assert len(records) == 8 and all(r.completed for r in records)
    assert [r.output_len for r in records] == [s.output_len for s in specs]
    # Every one of the 56+ decode steps reads each GPU's 70.6 GB of weights at 3.35 TB/s at least once.
    assert executor.now() > min(s.output_len for s in specs) * 141.1e9 / 2 / 3.35e12


def test_a_size_the_heads_cannot_be_split_by_is_refused_naming_the_counts() -> None:
    with pytest.raises(ValueError, match="tensor parallel size 3 does not divide the model's 40 attention heads"):
        builtin_profile("h200-qwen2.5-32b-tp3")
    odd = dataclasses.replace(PRESETS["llama3-8b"], num_heads=24, num_kv_heads=6)
    with pytest.raises(ValueError, match="tensor parallel size 4 does not divide the model's 6 kv heads"):
        sharding(odd, 4)
    few = dataclasses.replace(PRESETS["llama3-8b"], num_heads=24, num_kv_heads=4)
    with pytest.raises(ValueError, match="size 6 is above the model's 4 kv heads but not a multiple of them"):
        sharding(few, 6)
    with pytest.raises(ValueError, match="must be >= 1"):
        sharding(odd, 0)
    with pytest.raises(ValueError, match="unknown profile"):
        builtin_profile("h100-llama3-8b-tpx")
