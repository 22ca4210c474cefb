"""A small real engine and a scripted policy for engine tests: tests say who is preempted, resumed or aborted.

`ScriptedPolicy` is a real Policy: each iteration it applies the test's queued actions, then schedules every
running request and admits waiting ones in order (the fcfs admission helpers), like any policy would.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import os
from collections.abc import Iterator

import numpy as np
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tokenflow_jax.engine.core import EngineCore
from tokenflow_jax.engine.executor import EngineExecutor
from tokenflow_jax.engine.llm import LLM
from tokenflow_jax.kv.host_pool import HOST_KV_MEMORY_ENV
from tokenflow_jax.kv.pages import pages_for
from tokenflow_jax.request import Request, RequestStatus
from tokenflow_jax.sampling import SamplingParams
from tokenflow_jax.scheduler.budget import admit_in_order, budget_for, write_through_order
from tokenflow_jax.scheduler.interface import SchedulerState, StepPlan

PAGE_SIZE = 4  # small pages: many page boundaries in short sequences
ENGINE_KW = dict(
    scheduler="fcfs", page_size=PAGE_SIZE, max_num_seqs=4, max_batch_tokens=32, max_model_len=64,
    kv_pages=47, host_kv_pages=95, warmup=False,
)  # fmt: skip
MAX_TOKENS = 12


@contextlib.contextmanager
def host_kv_memory(kind: str) -> Iterator[None]:
    """Engines built inside keep their host KV pages in `kind` memory (`kv.host_pool`)."""
    before = os.environ.get(HOST_KV_MEMORY_ENV)
    os.environ[HOST_KV_MEMORY_ENV] = kind
    try:
        yield
    finally:
        if before is None:
            del os.environ[HOST_KV_MEMORY_ENV]
        else:
            os.environ[HOST_KV_MEMORY_ENV] = before


@functools.lru_cache(maxsize=1)
def small_llm() -> LLM:
    # Random weights: every token depends on the whole context, so any damage to the KV pages shows. Host pages
    # in pinned host memory, as on a GPU (the CPU's default is numpy, which the engine without a prefix cache keeps).
    with host_kv_memory("pinned_host"):
        return LLM("tiny-random", **ENGINE_KW)


@functools.lru_cache(maxsize=1)
def small_llm_without_prefix_cache() -> LLM:
    """The same engine with the prefix cache off: write-through and swap-out take their plain paths."""
    return LLM("tiny-random", **ENGINE_KW, enable_prefix_caching=False)


def prompt_pool(n: int = 6, seed: int = 7) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, 256, int(rng.integers(3, 20)))] for _ in range(n)]


@functools.lru_cache(maxsize=1)
def reference_outputs() -> tuple[tuple[int, ...], ...]:
    """Greedy outputs of the pool, each request alone and never preempted."""
    llm = small_llm()
    sp = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    return tuple(tuple(llm.generate([p], sp)[0].token_ids) for p in prompt_pool())


@functools.lru_cache(maxsize=1)
def sampled_reference_outputs() -> tuple[tuple[int, ...], ...]:
    """Seeded sampled outputs of the pool, each request alone and never preempted (seed: its index + 1)."""
    llm = small_llm()
    return tuple(
        tuple(llm.generate([p], dataclasses.replace(SAMPLED, seed=i + 1))[0].token_ids)
        for i, p in enumerate(prompt_pool())
    )


class ScriptedPolicy:
    name = "scripted"
    uses_write_through = True

    def __init__(self) -> None:
        self.swap_out: list[str] = []
        self.recompute_out: list[str] = []
        self.swap_in: list[str] = []
        self.hold: set[str] = set()  # paused requests the script keeps paused

    def plan(self, state: SchedulerState) -> StepPlan:
        plan = StepPlan(swap_out=self.swap_out, recompute_out=self.recompute_out, swap_in=self.swap_in)
        self.swap_out, self.recompute_out, self.swap_in = [], [], []
        leaving = set(plan.swap_out) | set(plan.recompute_out)
        budget = budget_for(state)
        ex = state.executor
        paused = {r.request_id: r for r in state.paused}
        for rid in plan.swap_in:
            budget.pages -= pages_for(paused[rid].num_computed, ex.page_size)
        for req in state.running:
            if req.request_id in leaving:
                budget.pages += state.pages_freed_by(req)
        to_run = [r for r in state.running if r.request_id not in leaving]
        to_run += [paused[rid] for rid in plan.swap_in]
        for req in to_run:
            n, pages = budget.chunk(state, req)
            if n > 0 and pages <= budget.pages and budget.seqs > 0:
                budget.take(plan, req, n, pages)
        # Resumed requests that found no room this step stay RUNNING-bound via swap_in only if scheduled.
        admit_in_order(state, plan, budget, list(state.waiting))
        plan.sync_order = write_through_order(state, plan)
        return plan


def scripted_core(executor: EngineExecutor, eos: frozenset[int] = frozenset()) -> tuple[EngineCore, ScriptedPolicy]:
    policy = ScriptedPolicy()
    return EngineCore(executor, policy, eos_token_ids=eos), policy


# Seeded sampling: each request of the pool draws with its own seed (its index + 1).
SAMPLED = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0.9, top_k=40, top_p=0.95)


def add(
    core: EngineCore,
    rid: str,
    prompt: list[int],
    max_tokens: int = MAX_TOKENS,
    *,
    sampling: SamplingParams | None = None,
    seed: int = 0,
) -> Request:
    sampling = sampling or SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    req = Request(rid, list(prompt), sampling, 20.0, core.executor.now(), seed=seed)
    core.add_request(req)
    return req


def check_page_ownership(core: EngineCore) -> None:
    """Every used page on each tier is held by live requests, as many as its reference count (prefix-cached pages
    are shared); no request holds a page twice; nothing leaks; idle cached pages are held by no one."""
    ex = core.executor
    for tier, alloc in (("device", ex.blocks.device), ("host", ex.blocks.host)):
        owners = collections.Counter()
        for r in core.requests.values():
            pages = list(getattr(r, f"{tier}_pages"))
            assert len(pages) == len(set(pages)), f"{r.request_id} holds a {tier} page twice: {pages}"
            owners.update(pages)
        assert 0 not in owners, f"{tier} null page handed out"
        assert len(owners) == alloc.num_used, f"{tier}: {alloc.num_used} used, {len(owners)} owned"
        assert all(alloc.refcount(p) == n for p, n in owners.items()), f"{tier}: reference counts off"
        assert not any(alloc.is_idle(p) for p in owners), f"{tier}: a held page is idle"


def check_host_copies(core: EngineCore) -> None:
    """For every request on the device, host pages hold the same K/V for its synced prefix."""
    ex = core.executor
    ex.host.flush()
    s = ex.page_size
    pages = ex.host.host_pages(range(ex.host.num_pages))
    for req in core.requests.values():
        if req.status is not RequestStatus.RUNNING or not req.device_pages:
            continue
        n = min(req.num_host_synced, req.num_computed)
        for t in range(n):
            hp, dp = req.host_pages[t // s], req.device_pages[t // s]
            host = pages[hp, :, :, :, t % s]
            device = np.stack([np.stack([np.asarray(k[:, dp, t % s]), np.asarray(v[:, dp, t % s])])
                               for k, v in ex.runner.kv_cache])  # fmt: skip
            np.testing.assert_array_equal(host, device, err_msg=f"{req.request_id} token {t}")


def check_executor_clean(ex: EngineExecutor, when: str) -> None:
    """A shared executor between tests: no page held on either tier, and every write-through copy drains (the copy
    thread may still be running the last ones: wait for it, then none may be left counted)."""
    device, _, host, _ = ex.page_usage()
    assert device == 0 and host == 0, f"{when} the test: {device} device and {host} host pages held"
    ex.host.flush()
    assert ex._pending_to_host_pages() == 0, f"{when} the test: host copies still counted after a flush"


class ScriptedEngineRules(RuleBasedStateMachine):
    """Rules shared by the engine's state machines: admit one of `self.prompts`, step, preempt (swap or
    recompute), resume and abort, each on the k-th live request. Rules draw plain integers and pick among the
    live requests with them: which requests are live depends on measured costs (the prefix cache's reload or
    recompute), and what hypothesis draws must not. Subclasses set `ex`, `core`, `policy`, `prompts`, `expected`
    and add their invariants."""

    id_prefix = "m"

    def __init__(self) -> None:
        super().__init__()
        self.index: dict[str, int] = {}
        self.aborted: set[str] = set()
        self.n = 0

    @invariant()
    def host_pages_load_on_the_load_thread(self) -> None:
        """Swap-ins and host prefix hits read host pages on the tier's load thread, never on the engine's."""
        reads = self.ex.host.loads_by_thread()
        if not hasattr(self, "reads_before"):
            self.reads_before = reads
        assert set(reads - self.reads_before) <= {"kv-load"}, dict(reads - self.reads_before)

    def pick(self, status: RequestStatus | None, k: int) -> str | None:
        """The k-th live request (modulo) in `status`, any status if None."""
        live = sorted(self.core.live_ids() if status is None else
                      (r.request_id for r in self.core.requests.values() if r.status is status))  # fmt: skip
        return live[k % len(live)] if live else None

    @rule(i=st.integers(0, 5))
    def admit(self, i: int) -> None:
        rid = f"{self.id_prefix}{self.n}"
        self.n += 1
        self.index[rid] = i
        add(self.core, rid, self.prompts[i])

    @rule(steps=st.integers(1, 4))
    def step(self, steps: int) -> None:
        for _ in range(steps):
            if self.core.has_work():
                self.core.step()

    @rule(k=st.integers(0, 7), swap=st.booleans())
    def preempt(self, k: int, swap: bool) -> None:
        rid = self.pick(RequestStatus.RUNNING, k)
        if rid is not None:
            (self.policy.swap_out if swap else self.policy.recompute_out).append(rid)
            self.core.step()

    @rule(k=st.integers(0, 7))
    def resume(self, k: int) -> None:
        rid = self.pick(RequestStatus.PAUSED, k)
        if rid is not None and pages_for(self.core.requests[rid].num_computed, self.ex.page_size) <= (
            self.ex.free_device_pages()
        ):
            self.policy.swap_in.append(rid)
            self.core.step()

    @rule(k=st.integers(0, 7))
    def abort(self, k: int) -> None:
        rid = self.pick(None, k)
        if rid is not None:
            self.aborted.add(rid)
            self.core.abort(rid)
