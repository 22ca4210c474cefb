"""What every policy shares: the write-through order each plan carries (largest unread buffer first)."""

from __future__ import annotations

import pytest

from tokenflow_jax.engine.core import EngineCore
from tokenflow_jax.request import Request
from tokenflow_jax.sampling_params import SamplingParams
from tokenflow_jax.scheduler.budget import write_through_order
from tokenflow_jax.scheduler.interface import SchedulerState
from tokenflow_jax.scheduler.registry import POLICIES, make_policy
from tokenflow_jax.sim.executor import SimExecutor


def busy_core(policy: str) -> EngineCore:
    """Readers of very different speeds, decoding for a while: their unread buffers differ."""
    core = EngineCore(SimExecutor("h100-llama3-8b", num_device_pages=256, num_host_pages=256), make_policy(policy))
    for i, rate in enumerate([2.0, 50.0, 10.0, 200.0, 5.0]):
        core.add_request(Request(f"r{i}", [1] * 20, SamplingParams(max_tokens=64, ignore_eos=True), rate, 0.0))
    for _ in range(12):
        core.step()
    return core


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_asks_for_the_largest_buffers_to_be_synced_first(policy: str) -> None:
    core = busy_core(policy)
    state = SchedulerState(core.executor.now(), core.waiting, core.running, core.paused, core.tracker, core.executor)
    plan = core.policy.plan(state)
    assert plan.schedule and sorted(plan.sync_order) == sorted(plan.schedule)
    unread = core.tracker.buffer_tokens_of(plan.sync_order, state.now)
    assert unread == sorted(unread, reverse=True) and unread[0] > unread[-1]
    assert plan.sync_order == write_through_order(state, plan)
    assert isinstance(core.policy.uses_write_through, bool)
