"""The streams' stall bound (`bounds.stream_stall_bound`): no policy's streams stall less than it at that run's
own streams' P99 TTFT, on the simulator; it is not vacuous where a step is slower than a reader's period; and
the mixed-sweep table (`bench.mixed_stall`) puts it beside the runs."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tokenflow_jax.bench import mixed_stall
from tokenflow_jax.bench import paper_setups as ps
from tokenflow_jax.bench.bounds import StepCosts, min_duration, stream_stall_bound
from tokenflow_jax.engine.core import EngineCore
from tokenflow_jax.metrics import summarize
from tokenflow_jax.scheduler.registry import make_policy
from tokenflow_jax.sim.executor import SimExecutor
from tokenflow_jax.sim.profiles import builtin_profile
from tokenflow_jax.sim.replay import replay
from tokenflow_jax.workloads import RequestSpec, burst, gamma, scale_lengths

MIX = "20:0.5,none:0.5"


def run(profile, specs: list[RequestSpec], policy: str, pages: int | None = None) -> tuple[dict, StepCosts]:
    ex = SimExecutor(profile, num_device_pages=pages, max_model_len=ps.MAX_MODEL_LEN)
    records = replay(EngineCore(ex, make_policy(policy)), specs, progress=False)
    return summarize(records), StepCosts.of_executor(ex)


WORKLOADS = {
    # The RTX 4090 naive step (51.7 ms base) is slower than a 20 tok/s reader's 50 ms: every stream stalls.
    "rtx4090 burst": ("rtx4090-llama3-8b", burst(40, prompt="64:8:80", output="200:20:240", rates=MIX, seed=1), None),
    "rtx4090 gamma": (
        "rtx4090-llama3-8b",
        gamma(16, 4.0, 0.84, prompt="64:8:80", output="96:16:128", rates=MIX, seed=2),
        None,
    ),  # fmt: skip
    # The H200 at a pool of 64 pages: memory binds, the step does not.
    "h200 small pool": (
        "h200-llama3-8b",
        scale_lengths(burst(24, rates=MIX, seed=3), prompt_scale=0.125, output_scale=0.125),
        64,
    ),  # fmt: skip
}
CASES = [("rtx4090 burst", "fcfs"), ("rtx4090 burst", "tokenflow"), ("rtx4090 gamma", "sglang"),
         ("h200 small pool", "andes")]  # every policy once, to keep it quick  # fmt: skip


@pytest.mark.parametrize(("name", "policy"), CASES, ids=lambda x: x)
def test_no_policy_stalls_its_streams_less_than_the_bound(name: str, policy: str) -> None:
    profile_name, specs, pages = WORKLOADS[name]
    summary, costs = run(builtin_profile(profile_name), specs, policy, pages)
    assert summary["failed"] == 0
    bound = stream_stall_bound(specs, costs, summary["p99_stream_ttft_ms"] / 1e3)
    assert bound.playback_s == pytest.approx(summary["stream_playback_s"])
    assert summary["stream_rebuffer_s"] >= bound.stall_s
    assert summary["stream_max_rebuffer_share"] >= bound.share
    if name == "rtx4090 burst":  # not vacuous: 20 streams' steps outlast their reading
        assert bound.stall_s > 0


def test_a_lone_stream_on_a_step_slower_than_its_reader() -> None:
    """One stream, one step a token: its stall is at least (L - 1) (step - 1/r); the bound lies between the part
    of that its time grid sees and the stall itself, and a looser TTFT cap never raises it."""
    profile = builtin_profile("rtx4090-llama3-8b")
    specs = [RequestSpec("s", 0.0, 64, 200, 20.0)]
    summary, costs = run(profile, specs, "fcfs")
    step = costs.base_s + costs.per_token_s + costs.per_context_token_s * 64
    floor = 199 * (step - 1 / 20)
    bound = stream_stall_bound(specs, costs, summary["p99_stream_ttft_ms"] / 1e3)
    assert 0.5 * floor <= bound.stall_s <= summary["stream_rebuffer_s"]
    assert stream_stall_bound(specs, costs, 10.0).stall_s <= bound.stall_s


def test_no_rates_no_bound() -> None:
    costs = StepCosts(0.01, 0.0, 0.0, 0.0, 0.0, 1000, 4, 100)
    assert stream_stall_bound([RequestSpec("a", 0.0, 8, 8, None)], costs, 1.0).stall_s == 0.0


def test_the_mixed_stall_table_puts_the_bound_beside_the_runs(tmp_path) -> None:
    setup = dataclasses.replace(ps.paper_setups()[4], num_requests=8)  # the RTX 4090 short burst, cut down
    assert setup.gpu == "rtx4090" and setup.kind == "burst"
    runs = [ps.run_one(setup, MIX, policy, "naive") for policy in ("fcfs", "tokenflow")]
    path = tmp_path / "runs.json"
    path.write_text(json.dumps(runs))
    setups = {setup.name: setup}
    rows = mixed_stall.stall_rows(runs, setups)
    assert len(rows) == 1 and rows[0]["bound_share"] is not None
    assert rows[0]["fcfs_share"] >= rows[0]["bound_share"] >= 0
    assert rows[0]["bound_tokens_share"] >= rows[0]["bound_share"]  # one more clause: never lower
    text = mixed_stall.main([str(path)], setups)
    assert text.count("\n") == 2 and mixed_stall.verdict(rows[0]) in text


@pytest.mark.parametrize(("name", "policy"), CASES, ids=lambda x: x)
def test_within_its_own_span_no_policy_stalls_less_than_the_bound_either(name: str, policy: str) -> None:
    """With the span (every token of every request, rate-less ones too, by then) set to the run's own, the run is
    one of the schedules bounded: its streams stall at least the bound, which is at least the bound without it;
    a span shorter than any schedule's (a third of the least duration) leaves none."""
    profile_name, specs, pages = WORKLOADS[name]
    summary, costs = run(builtin_profile(profile_name), specs, policy, pages)
    cap_s = summary["p99_stream_ttft_ms"] / 1e3
    span_s = sum(x.output_len for x in specs) / summary["output_throughput"]
    bound = stream_stall_bound(specs, costs, cap_s, span_s=span_s * (1 + 1e-9))
    assert stream_stall_bound(specs, costs, cap_s).stall_s <= bound.stall_s <= summary["stream_rebuffer_s"]
    assert stream_stall_bound(specs, costs, cap_s, span_s=min_duration(specs, costs) / 3).stall_s == float("inf")
