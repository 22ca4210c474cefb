"""SimExecutor: cost profiles, virtual clock, transfer timelines and page accounting."""

from __future__ import annotations

import numpy as np
import pytest

from tokenflow_jax import workloads
from tokenflow_jax.config import PRESETS
from tokenflow_jax.engine.core import EngineCore
from tokenflow_jax.request import Request
from tokenflow_jax.sampling import SamplingParams
from tokenflow_jax.scheduler.interface import StepPlan
from tokenflow_jax.scheduler.registry import make_policy
from tokenflow_jax.sim.executor import SimExecutor
from tokenflow_jax.sim.profiles import (
    BUILTIN_PROFILES,
    H100_NAIVE_DECODE,
    H100_PREFILL,
    builtin_profile,
    load_profile,
    profile_from_engine_measurements,
)
from tokenflow_jax.sim.replay import replay


def test_h100_profile_reproduces_the_reference_timings():
    p = builtin_profile("h100-llama3-8b")
    for batch, ctx, seconds in H100_NAIVE_DECODE:
        assert p.step_time(batch, batch * ctx) == pytest.approx(seconds, rel=0.05)
    for n, seconds in H100_PREFILL[1:]:  # 128 tokens is weight-bound noise below the model's floor
        assert p.step_time(n, n, n, n * n / 2) == pytest.approx(seconds, rel=0.12)
    assert p.page_bytes(16) == 2 * 1024 * 1024  # Llama-3-8B bf16: 128 KiB per token


def test_builtin_profiles_scale_with_hardware_and_model():
    h100, h200 = builtin_profile("h100-llama3-8b"), builtin_profile("h200-llama3-8b")
    qwen, rtx = builtin_profile("h100-qwen2.5-32b"), builtin_profile("rtx4090-llama3-8b")
    assert h200.step_time(64, 64 * 1024) == pytest.approx(h100.step_time(64, 64 * 1024) / 1.43, rel=0.05)
    assert h200.device_pages(16) > h100.device_pages(16) > rtx.device_pages(16) > 0
    assert qwen.step_base_s == pytest.approx(4 * h100.step_base_s, rel=0.1)  # ~4x the weight bytes
    assert qwen.kv_bytes_per_token == 2 * h100.kv_bytes_per_token
    assert builtin_profile("h200-llama3-8b-roofline").step_base_s < h200.step_base_s
    assert {p for p in BUILTIN_PROFILES} <= {builtin_profile(p).name for p in BUILTIN_PROFILES}
    with pytest.raises(ValueError, match="unknown profile"):
        builtin_profile("tpu-llama3-8b")
    with pytest.raises(ValueError, match="no room"):
        builtin_profile("rtx4090-qwen2.5-32b")


def test_profile_json_round_trip_and_engine_fit(tmp_path):
    cfg = PRESETS["llama3-8b"]
    fitted = profile_from_engine_measurements(
        "measured", cfg, decode=[(b, c, 0.01 + 1e-5 * b + 1e-7 * b * c) for b, c in [(1, 512), (8, 1024), (32, 2048)]],
        prefill=[(256, 0.02), (1024, 0.05)], d2h=[(8, 0.001), (64, 0.004)], h2d=[(8, 0.001), (64, 0.005)],
        page_bytes=2 << 20, device_kv_bytes=8e9, host_kv_bytes=32e9,
    )  # fmt: skip
    assert fitted.step_base_s == pytest.approx(0.01) and fitted.step_per_context_token_s == pytest.approx(1e-7)
    path = tmp_path / "profile.json"
    fitted.save(path)
    assert load_profile(path) == fitted
    assert SimExecutor(path).num_device_pages == fitted.device_pages(16)
    path.write_text('{"name": "x"}')
    with pytest.raises(ValueError, match="expected fields"):
        load_profile(path)


def _request(rid: str, prompt: int = 40, output: int = 8) -> Request:
    return Request(rid, [1] * prompt, SamplingParams(max_tokens=output, ignore_eos=True), rate=20.0, arrival=0.0)


def _sample(result, reqs) -> None:
    for rid, token in result.sampled.items():  # what EngineCore does with sampled tokens
        reqs[rid].output_ids.append(token)


def test_compute_advances_the_clock_by_the_cost_model():
    ex = SimExecutor("h100-llama3-8b", num_device_pages=64, num_host_pages=64)
    reqs = {"a": _request("a"), "b": _request("b")}
    _sample(ex.execute(StepPlan(schedule={"a": 40, "b": 40}), reqs), reqs)
    prefill = ex.profile.step_time(80, 80, 80, 2 * 40 * 20)
    assert ex.now() == pytest.approx(prefill)
    result = ex.execute(StepPlan(schedule={"a": 1, "b": 1}), reqs)
    assert result.step_time_s == pytest.approx(ex.profile.step_time(2, 82))
    assert result.sampled == {"a": 1, "b": 1}
    ex.idle_until(0.0)  # never backwards
    assert ex.now() == pytest.approx(prefill + result.step_time_s)
    ex.idle_until(100.0)
    assert ex.now() == 100.0


def test_write_through_overlaps_compute_and_a_swap_in_waits_for_its_host_copy():
    ex = SimExecutor("h100-llama3-8b", num_device_pages=64, num_host_pages=64)
    reqs = {"a": _request("a", prompt=320)}
    _sample(ex.execute(StepPlan(schedule={"a": 320}), reqs), reqs)  # 20 full pages queue for the copy engine
    t = ex.now()
    assert ex.estimates().pending_transfer_s > 0 and ex.copy_free_at > t
    assert ex.bytes_to_host == 20 * ex.page_bytes
    ex.execute(StepPlan(swap_out=["a"]), reqs)
    # As in the engine, the device pages are free at once: the clock does not wait for the copy engine.
    assert ex.now() == pytest.approx(t) and ex.free_device_pages() == 64
    landed = ex.copy_free_at
    assert landed > t
    ex.execute(StepPlan(swap_in=["a"], schedule={"a": 1}), reqs)
    assert ex.bytes_to_device == 20 * ex.page_bytes  # the 320 computed tokens fill 20 pages
    load_s = ex.profile.h2d_latency_s + 20 * ex.page_bytes / ex.profile.h2d_bytes_per_s
    assert ex.load_free_at == pytest.approx(landed + load_s)  # its load starts once its host copy has landed
    assert ex.now() >= ex.load_free_at  # the step that runs a loaded request waits for its pages


@pytest.mark.parametrize("overlap", [True, False])
def test_the_estimates_measure_what_a_swap_adds_to_the_step_it_shares(overlap):
    """Serialised with compute (the CPU backend's copies share its cores), a load lengthens the step that runs it
    by its whole transfer: the executor reads it off the steps, per page swapped (the slope of the decode steps'
    time beyond their compute over the pages they moved: here the plain steps' 0 and the load's). Beside compute,
    on a load engine that finishes within the step before, it adds nothing."""
    ex = SimExecutor("h100-llama3-8b", num_device_pages=64, num_host_pages=64, overlap_transfers=overlap)
    reqs = {"a": _request("a", prompt=320, output=64), "b": _request("b", prompt=320, output=64)}
    _sample(ex.execute(StepPlan(schedule={"a": 320, "b": 320}), reqs), reqs)  # 20 full pages each, written through
    for _ in range(8):
        _sample(ex.execute(StepPlan(schedule={"a": 1}), reqs), reqs)
    ex.execute(StepPlan(swap_out=["b"]), reqs)  # nothing left to copy: write-through synced its 20 pages
    assert ex.estimates().swap_step_per_page_s == 0.0
    held = ex.held_s
    result = ex.execute(StepPlan(swap_in=["b"], schedule={"a": 1, "b": 1}), reqs)
    load_s = ex.profile.h2d_latency_s + 20 * ex.page_bytes / ex.profile.h2d_bytes_per_s
    compute_s = ex.profile.step_time(2, len(reqs["a"].prompt_ids) + len(reqs["a"].output_ids) + 321)
    if overlap:
        assert ex.estimates().swap_step_per_page_s == pytest.approx(0.0, abs=1e-12)  # (rounding of the compute)
        assert result.step_time_s == pytest.approx(compute_s)
    else:
        assert ex.held_s - held == pytest.approx(load_s) and result.step_time_s == pytest.approx(compute_s + load_s)
        assert ex.estimates().swap_step_per_page_s == pytest.approx(load_s / 20)


@pytest.mark.parametrize("policy", ["fcfs", "tokenflow"])
def test_replay_under_memory_pressure_leaks_no_pages_and_keeps_time_monotonic(policy):
    # 24 requests of ~ 200 tokens into 96 device pages (~ 8 requests' worth): preemptions are forced.
    ex = SimExecutor("h100-llama3-8b-roofline", num_device_pages=96, num_host_pages=256, max_num_seqs=16)
    core = EngineCore(ex, make_policy(policy))
    times = []
    step = core.step

    def timed_step():
        times.append(ex.now())
        return step()

    core.step = timed_step
    specs = workloads.poisson(24, 20.0, prompt="96:16", output="96:16", rates="20", seed=3)
    records = replay(core, specs, progress=False)
    assert len(records) == 24 and all(r.output_len == s.output_len for r, s in zip(records, specs, strict=True))
    assert times == sorted(times)
    assert ex.free_device_pages() == ex.num_device_pages and ex.free_host_pages() == ex.num_host_pages
    if policy == "tokenflow":
        assert sum(r.preemptions_swap + r.preemptions_recompute for r in records) > 0


def test_every_pool_counts_usable_pages_and_the_null_page_is_never_handed_out():
    ex = SimExecutor("h100-llama3-8b", num_device_pages=5, num_host_pages=3)
    assert (ex.num_device_pages, ex.num_host_pages) == (5, 3)
    assert ex.free_device_pages() == 5 and ex.page_usage() == (0, 5, 0, 3)
    reqs = {"a": _request("a", prompt=80)}  # 80 tokens: exactly the 5 usable pages of 16
    ex.execute(StepPlan(schedule={"a": 80}), reqs)
    assert sorted(reqs["a"].device_pages.tolist()) == [1, 2, 3, 4, 5] and ex.free_device_pages() == 0


def test_a_swap_the_host_tier_cannot_hold_falls_back_to_recompute_and_is_reported():
    ex = SimExecutor("h100-llama3-8b", num_device_pages=64, num_host_pages=2, write_through=False)
    core = EngineCore(ex, make_policy("fcfs"))
    small, big = _request("small", prompt=16), _request("big", prompt=100)  # 1 page and 7 pages
    for req in (small, big):
        core.add_request(req)
    core.step()  # both prefill and sample their first token
    result = ex.execute(StepPlan(swap_out=["small", "big"]), core.requests)
    assert result.swap_fallbacks == ["big"]  # 7 pages do not fit 2 host pages; 1 does
    assert big.num_computed == 0 and not big.host_pages and len(small.host_pages) >= 1
    assert ex.free_device_pages() == 64

    # Through the core, the fallback is counted as a recompute and the request waits to recompute.
    ex2 = SimExecutor("h100-llama3-8b", num_device_pages=64, num_host_pages=2, write_through=False)
    core2 = EngineCore(ex2, _SwapOutOnce("big"))
    core2.add_request(big2 := _request("big", prompt=100))
    core2.step()
    core2.step()
    assert big2.status.value == "waiting" and (big2.preemptions_swap, big2.preemptions_recompute) == (0, 1)


class _SwapOutOnce:
    """fcfs, except that its second plan pauses one request by swap."""

    name = "swap-out-once"
    uses_write_through = False

    def __init__(self, request_id: str) -> None:
        self.request_id, self.plans, self.fcfs = request_id, 0, make_policy("fcfs")

    def plan(self, state):
        self.plans += 1
        if self.plans == 2:
            return StepPlan(swap_out=[self.request_id])
        return self.fcfs.plan(state)


def test_the_serving_loop_fit_recovers_a_known_step_cost_despite_noise_and_a_compile() -> None:
    from tokenflow_jax.sim.profiles import fit_steps

    rng = np.random.default_rng(0)
    truth = (2e-3, 1e-4, 2e-7, 0.0, 1e-6)  # no per-prefill-token term: the fit must not go negative

    def cost(coef, terms) -> float:
        return coef[0] + sum(c * t for c, t in zip(coef[1:], terms, strict=True))

    steps = []
    for _ in range(400):
        tokens = int(rng.integers(1, 64))
        prefill = tokens * int(rng.integers(0, 2))
        steps.append((tokens, tokens * int(rng.integers(10, 200)), prefill, prefill * float(rng.integers(10, 100))))
    records = [(*terms, cost(truth, terms) * rng.normal(1, 0.03)) for terms in steps]
    records[0] = (*records[0][:4], 5.0)  # a step that compiled
    fit = fit_steps(records)
    assert all(v >= 0 for v in fit) and abs(fit[0] - truth[0]) <= 0.1 * truth[0]
    for terms in steps:  # every step's cost within 3% (the noise's sd) of the true one
        assert abs(cost(fit, terms) - cost(truth, terms)) <= 0.03 * cost(truth, terms)
