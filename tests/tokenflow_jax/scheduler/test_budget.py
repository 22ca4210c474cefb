"""What every policy shares: the write-through order each plan carries (largest unread buffer first)."""

from __future__ import annotations

import pytest

from tokenflow_jax.engine.core import EngineCore
from tokenflow_jax.reader import TAU1_FRACTION
from tokenflow_jax.request import Request
from tokenflow_jax.sampling_params import SamplingParams
from tokenflow_jax.scheduler.budget import write_through_order
from tokenflow_jax.scheduler.interface import SchedulerState
from tokenflow_jax.scheduler.registry import POLICIES, make_policy
from tokenflow_jax.scheduler.tokenflow import TokenFlowConfig
from tokenflow_jax.sim.executor import SimExecutor
from tokenflow_jax.sim.profiles import SimProfile


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


def test_where_copies_stretch_the_steps_tokenflow_writes_through_only_streams_that_could_give_way() -> None:
    """Copies that share the compute's cores (the CPU backend: a measured `swap_step_per_page_s` > 0) are written
    through only for streams past where they sort after a newcomer (tau1 of buffer, or `stickiness_s`); the others
    are paused only on a page shortage and copy their pages then (docs/DESIGN.md 4). Where the copies cost the steps
    nothing, every scheduled request writes through (above)."""
    profile = SimProfile("cpu-contended", 3.69e-3, 0.0, 1.25e-8, 0.0, 2.59e-6, 2e-3, 1.21e9, 3e-3, 1.37e9, 1024,
                         48 * 16 * 1024, 96 * 16 * 1024)  # fmt: skip
    ex = SimExecutor(profile, num_device_pages=48, num_host_pages=10_000, max_num_seqs=32, max_batch_tokens=256,
                     max_model_len=256, overlap_transfers=False)  # fmt: skip
    core = EngineCore(ex, make_policy("tokenflow"))
    for i in range(96):
        core.add_request(Request(f"r{i}", [1] * 36, SamplingParams(max_tokens=96, ignore_eos=True), 20.0, 0.0))
    floor = min(TAU1_FRACTION * 96, TokenFlowConfig().stickiness_s * 20.0)
    left_out = synced = 0
    for _ in range(300):
        state = SchedulerState(ex.now(), core.waiting, core.running, core.paused, core.tracker, ex)
        plan = core.policy.plan(state)
        if ex.estimates().swap_step_per_page_s > 0:
            scheduled = list(plan.schedule)
            unread = dict(zip(scheduled, core.tracker.buffer_tokens_of(scheduled, state.now), strict=True))
            assert plan.sync_order == [rid for rid in write_through_order(state, plan) if unread[rid] >= floor]
            left_out += len(plan.schedule) - len(plan.sync_order)
            synced += len(plan.sync_order)
        else:
            assert sorted(plan.sync_order) == sorted(plan.schedule)
        core.step()
    assert left_out > 0 and synced > 0
