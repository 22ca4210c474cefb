"""The limits beside every figure (`tokenflow_jax.bench.bounds`): no policy beats them, on any paper setup on the
simulator (at cheap sizes, with the pool shrunk alike so memory binds as it does at full size) and on the real
engine's small bench (`test_schedulers`); and they are not vacuous where the answer is known."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from tokenflow_jax.bench import ablation
from tokenflow_jax.bench import paper_setups as ps
from tokenflow_jax.bench.bounds import StepCosts, prompt_extra, workload_bounds
from tokenflow_jax.bench.faithful import faithful_setups
from tokenflow_jax.engine.core import EngineCore
from tokenflow_jax.metrics import summarize
from tokenflow_jax.scheduler.registry import make_policy
from tokenflow_jax.sim.executor import SimExecutor
from tokenflow_jax.sim.profiles import load_profile
from tokenflow_jax.sim.replay import replay
from tokenflow_jax.workloads import RequestSpec, scale_lengths

SCALE = 0.1  # requests of each setup, at most MAX_REQUESTS
LENGTH_SCALE = 0.125  # prompt and output lengths; the device pool shrinks by both
MAX_REQUESTS = 32


def assert_within(summary: dict, bounds, what: str) -> None:
    assert summary["failed"] == 0, what
    assert summary["effective_throughput"] <= bounds.effective_throughput * (1 + 1e-9), what
    assert summary["output_throughput"] <= bounds.output_throughput * (1 + 1e-9), what
    assert summary["p99_ttft_ms"] / 1e3 >= bounds.p99_ttft_s * (1 - 1e-9), what
    assert summary["mean_ttft_ms"] / 1e3 >= bounds.mean_ttft_s * (1 - 1e-9), what
    assert summary["duration"] >= bounds.min_duration_s * (1 - 1e-9), what


def cheap(setup: ps.PaperSetup) -> ps.PaperSetup:
    """Fewer requests; a Poisson or gamma run keeps its rate and spans less time."""
    n = min(MAX_REQUESTS, max(6, round(SCALE * setup.num_requests)))
    return dataclasses.replace(setup, num_requests=n, duration_s=setup.duration_s and n / setup.request_rate)


EVERY_SETUP = {s.name: s for s in ps.paper_setups(("llama3-8b", "qwen2.5-32b")) + faithful_setups()}


@pytest.mark.parametrize("setup", [cheap(s) for s in EVERY_SETUP.values()], ids=lambda s: s.name)
def test_no_policy_beats_the_bounds_on_a_paper_setup(setup: ps.PaperSetup) -> None:
    profile = setup.sim_profile("roofline")
    pages = max(64, round(SCALE * LENGTH_SCALE * profile.device_pages(16)))
    specs = scale_lengths(setup.specs("15:0.4,20:0.6", seed=3), prompt_scale=LENGTH_SCALE, output_scale=LENGTH_SCALE)
    for policy in ps.available_policies(ps.FAITHFUL_POLICIES):
        ex = SimExecutor(profile, num_device_pages=pages, max_model_len=ps.MAX_MODEL_LEN)
        core = EngineCore(ex, make_policy(policy))
        records = replay(core, specs, progress=False)
        bounds = workload_bounds(specs, StepCosts.of_executor(ex))  # the cost model this run used
        assert_within(summarize(records), bounds, f"{setup.name} {policy}")


# The bursts: where the pool binds and tokenflow pauses, so the switched-off parts cost something.
@pytest.mark.parametrize("setup", [cheap(s) for s in faithful_setups() if s.kind == "burst"], ids=lambda s: s.name)
def test_no_ablation_variant_beats_the_bounds_of_its_own_executor(setup: ps.PaperSetup) -> None:
    profile = setup.sim_profile("roofline")
    pages = max(64, round(SCALE * LENGTH_SCALE * profile.device_pages(16)))
    specs = scale_lengths(setup.specs("20", seed=3), prompt_scale=LENGTH_SCALE, output_scale=LENGTH_SCALE)
    for variant, (preemption, options, _) in ablation.VARIANTS.items():
        if variant == "full":  # the test above runs it
            continue
        ex = SimExecutor(profile, num_device_pages=pages, max_model_len=ps.MAX_MODEL_LEN, **dict(options))
        core = EngineCore(ex, make_policy("tokenflow"), preemption=preemption)
        records = replay(core, specs, progress=False)
        bounds = workload_bounds(specs, StepCosts.of_executor(ex))
        assert_within(summarize(records), bounds, f"{setup.name} {variant}")


def test_one_request_alone_meets_its_ttft_bound_and_the_prompt_floor_is_exact() -> None:
    # Alone, a request's first token is one prefill step: a + (b + c + p) P + q P^2 / 2, which the floor
    # undercuts only by the prompt relaxation (chunks of one token may replace the prefill terms).
    profile = load_profile("h100-llama3-8b")
    ex = SimExecutor(profile)
    spec = RequestSpec("only", 0.0, 512, 64, 20.0)
    s = summarize(replay(EngineCore(ex, make_policy("fcfs")), [spec], progress=False))
    bounds = workload_bounds([spec], StepCosts.of_executor(ex))
    assert_within(s, bounds, "alone")
    assert bounds.p99_ttft_s >= 0.9 * s["p99_ttft_ms"] / 1e3  # tight: the relaxation costs under 10% here
    # The prompt floor against a direct sum over positions.
    costs = StepCosts.of_executor(ex)
    t1 = np.arange(1, 512, dtype=np.float64)  # t + 1 for positions t < P - 1
    direct = np.minimum(costs.prefill_per_token_s + costs.prefill_per_pair_s * t1 / 2,
                        costs.per_context_token_s * t1).sum()  # fmt: skip
    assert math.isclose(prompt_extra(np.array([512]), costs)[0], direct, rel_tol=1e-12)


def test_the_effective_ceiling_counts_only_tokens_a_reader_could_weigh() -> None:
    # Free steps (a = 1 ms, nothing else): one request of 100 tokens read at 10 tok/s. It could finish in
    # D_min = 0.1 s, but then only tokens within 0.2 L + 2 of what was read weigh: 22 of 100.
    costs = StepCosts(1e-3, 0.0, 0.0, 0.0, 0.0, device_tokens=10_000, max_num_seqs=8, max_batch_tokens=64)
    spec = RequestSpec("r", 0.0, 4, 100, 10.0)
    b = workload_bounds([spec], costs)
    assert math.isclose(b.min_duration_s, 0.1) and math.isclose(b.p99_ttft_s, 1e-3)
    # max over D of min(100, 22 + 10 (D - 0.001)) / D: at D_min, (22 + 0.99) / 0.1.
    assert math.isclose(b.effective_throughput, (22 + 10 * (0.1 - 1e-3)) / 0.1)
    # A burst of 16 with 8 sequences a step: the 9th first token needs a second step.
    burst = [RequestSpec(f"r{i}", 0.0, 4, 100, 10.0) for i in range(16)]
    ttft = workload_bounds(burst, costs)
    assert math.isclose(ttft.mean_ttft_s, 1.5e-3) and math.isclose(ttft.min_duration_s, 0.2)
