"""The workload replayer: arrivals on the executor's clock, idle jumps, time limits, a stuck policy, real engine."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import pytest

from tokenflow_jax.engine.core import EngineCore
from tokenflow_jax.engine.paged_executor import PagedExecutor
from tokenflow_jax.scheduler.fcfs import FCFSPolicy
from tokenflow_jax.scheduler.interface import SchedulerState, StepPlan
from tokenflow_jax.sim import replay as replay_mod
from tokenflow_jax.sim.replay import prompt_ids, replay, spec_request
from tokenflow_jax.workloads import RequestSpec

os.environ.setdefault("TOKENFLOW_JAX_CACHE_DIR", os.path.join(tempfile.gettempdir(), "tokenflow_jax_test_xla"))

STEP_S = 0.01


class VirtualClockExecutor(PagedExecutor):
    """The shared page bookkeeping on a virtual clock: every model step takes STEP_S and samples token 7."""

    def __init__(self) -> None:
        super().__init__(num_device_pages=63, num_host_pages=0, page_size=16, max_num_seqs=8,
                         max_batch_tokens=128, max_model_len=1024)  # fmt: skip
        self.clock = 0.0

    def now(self) -> float:
        return self.clock

    def idle_until(self, t: float) -> None:
        self.clock = max(self.clock, t)

    def _compute(self, chunks: list, rows: list, request_ids: list) -> Any:
        self.clock += STEP_S
        return len(chunks)

    def _sampled_tokens(self, handle: Any) -> list[int]:
        return [7] * handle

    def _flush_to_host(self) -> None:
        pass


def spec(rid: str, arrival: float, output_len: int = 10, prompt_len: int = 20) -> RequestSpec:
    return RequestSpec(rid, arrival, prompt_len, output_len, 20.0)


def test_prompts_are_seeded_byte_tokens() -> None:
    s = spec("a", 0.0, prompt_len=50)
    assert prompt_ids(s, seed=1) == prompt_ids(s, seed=1) != prompt_ids(s, seed=2)
    assert len(prompt_ids(s)) == 50 and all(0 <= t < 256 for t in prompt_ids(s))
    req = spec_request(s, 3.5)
    assert (req.arrival, req.rate, req.sampling.max_tokens, req.sampling.ignore_eos) == (3.5, 20.0, 10, True)


def test_requests_enter_at_their_arrival_and_idle_time_is_skipped() -> None:
    ex = VirtualClockExecutor()
    ex.clock = 100.0
    specs = [spec("late", 5.0), spec("a", 0.0), spec("b", 0.0, output_len=3)]
    records = replay(EngineCore(ex, FCFSPolicy()), specs, progress=False)
    assert [r.request_id for r in records] == ["late", "a", "b"]  # spec order
    assert [r.arrival for r in records] == [105.0, 100.0, 100.0]
    assert [r.output_len for r in records] == [10, 10, 3]
    late = records[0]
    # The engine was idle from ~100.1 to 105: the clock jumped there instead of stepping through.
    assert 105.0 < late.token_times[0] <= 105.0 + 2 * STEP_S


def test_arrivals_are_reached_despite_rounding() -> None:
    # (1.0 + 0.2) - 1.0 < 0.2 in floating point: a replayer comparing `now - t0 >= arrival` idles forever.
    ex = VirtualClockExecutor()
    ex.clock = 1.0
    assert (1.0 + 0.2) - 1.0 < 0.2
    records = replay(EngineCore(ex, FCFSPolicy()), [spec("a", 0.2, output_len=2)], progress=False)
    assert records[0].output_len == 2 and records[0].arrival == 1.0 + 0.2


def test_time_limit_aborts_live_requests_and_reports_unsent_ones_as_failed() -> None:
    ex = VirtualClockExecutor()
    specs = [spec("short", 0.0, output_len=5), spec("long", 0.0, output_len=500), spec("never", 9.0)]
    records = {r.request_id: r for r in replay(EngineCore(ex, FCFSPolicy()), specs, time_limit=1.0, progress=False)}
    assert records["short"].output_len == 5
    assert 0 < records["long"].output_len < 500
    assert not records["never"].completed and records["never"].arrival == 9.0
    assert ex.free_device_pages() == ex.num_device_pages


class HoldEveryone:
    name = "hold"

    def plan(self, state: SchedulerState) -> StepPlan:
        return StepPlan()


def test_a_policy_that_never_schedules_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replay_mod, "STALL_LIMIT_S", 0.5)
    with pytest.raises(RuntimeError, match="no progress"):
        replay(EngineCore(VirtualClockExecutor(), HoldEveryone()), [spec("a", 0.0)], progress=False)


def test_replay_on_the_real_engine() -> None:
    from tokenflow_jax import LLM

    # The same engine shapes as the baseline tests: their compilations are reused from the persistent cache.
    llm = LLM("tiny", scheduler="fcfs", max_num_seqs=4, max_batch_tokens=32, max_model_len=128, kv_pages=8,
              warmup=False)  # fmt: skip
    specs = [spec("a", 0.0, output_len=8), spec("b", 0.0, output_len=6), spec("c", 0.3, output_len=4)]
    t0 = llm.executor.now()
    records = replay(llm.core, specs, progress=False)
    assert [r.output_len for r in records] == [8, 6, 4]
    c = records[2]
    assert c.arrival - t0 == pytest.approx(0.3, abs=0.05)
    assert c.token_times[0] >= c.arrival
    assert not llm.core.has_work()
