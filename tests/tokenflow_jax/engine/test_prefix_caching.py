"""Prefix caching in the real engine: requests that share full pages of prompt map them instead of computing
them, on the device or loaded back from the host tier, and their tokens equal those of the cache-off run, through
preemption by swap and by recompute; a state machine checks that no shared page is freed while held, none leaks,
and the host and device copies of a cached page agree."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import invariant

from tests.tokenflow_jax.engine.harness import (
    ENGINE_KW,
    MAX_TOKENS,
    PAGE_SIZE,
    ScriptedEngineRules,
    add,
    check_page_ownership,
    scripted_core,
)
from tokenflow_jax import LLM
from tokenflow_jax.engine.core import EngineCore
from tokenflow_jax.request import PENDING_TOKEN, RequestStatus
from tokenflow_jax.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
# A device pool of a few sequences: other traffic pushes a cached prefix off the device.
SMALL_POOL = dict(ENGINE_KW, kv_pages=20, host_kv_pages=64)


@functools.lru_cache(maxsize=1)
def cached_llm() -> LLM:
    return LLM("tiny-random", **SMALL_POOL)


def shared_prompts(n: int = 6, seed: int = 3) -> list[list[int]]:
    """Prompts that share a system prompt of 3 pages, some of them a longer history too."""
    rng = np.random.default_rng(seed)
    system = [int(t) for t in rng.integers(0, 256, 3 * PAGE_SIZE)]
    history = system + [int(t) for t in rng.integers(0, 256, 2 * PAGE_SIZE + 1)]
    prompts = []
    for i in range(n):
        base = history if i % 2 else system
        prompts.append(base + [int(t) for t in rng.integers(0, 256, int(rng.integers(1, 7)))])
    return prompts


@functools.lru_cache(maxsize=1)
def alone_outputs() -> tuple[tuple[int, ...], ...]:
    """Each shared prompt run alone with the cache off (the same engine, cache turned off for the run)."""
    llm = cached_llm()
    llm.executor.reset_prefix_cache(False)
    try:
        return tuple(tuple(llm.generate([p], GREEDY)[0].token_ids) for p in shared_prompts())
    finally:
        llm.executor.reset_prefix_cache(True)


def test_shared_prefixes_are_computed_once_and_give_the_cache_off_tokens() -> None:
    llm = cached_llm()
    llm.executor.reset_prefix_cache(True)
    prompts = shared_prompts()
    first = llm.generate(prompts[:1], GREEDY)
    rest = llm.generate(prompts[1:], GREEDY)
    assert [o.token_ids for o in first + rest] == [list(t) for t in alone_outputs()]
    assert first[0].num_cached_tokens == 0
    # Every later one finds at least the system prompt's 3 pages.
    assert all(o.num_cached_tokens >= 3 * PAGE_SIZE for o in rest), [o.num_cached_tokens for o in rest]
    stats = llm.core.prefix_cache
    assert stats.hits >= 3 * PAGE_SIZE * len(rest) and stats.queries >= sum(map(len, prompts))


def test_a_prefix_pushed_off_the_device_is_loaded_back_from_the_host_tier() -> None:
    """The issue's scenario: B shares a long prefix with A; other traffic has since taken every device page, so
    the prefix is only on the host; B reports it cached and returns the cache-off tokens."""
    llm = cached_llm()
    llm.executor.reset_prefix_cache(True)
    prompts = shared_prompts()
    a, b = prompts[1], prompts[3]  # the 5-page history
    llm.generate([a], GREEDY)
    rng = np.random.default_rng(99)
    others = [[int(t) for t in rng.integers(0, 256, 30)] for _ in range(4)]
    llm.generate(others, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    blocks = llm.executor.blocks
    hashes = blocks.page_hashes(llm.make_request(b, GREEDY), len(b) - 1)
    assert not blocks.device_index.lookup(hashes), "the other traffic did not push the prefix off the device"
    assert len(blocks.host_index.lookup(hashes)) == 5
    host_hits = llm.core.prefix_cache.host_hits
    (out,) = llm.generate([b], GREEDY)
    assert out.num_cached_tokens == 5 * PAGE_SIZE
    assert llm.core.prefix_cache.host_hits - host_hits == 5 * PAGE_SIZE
    assert tuple(out.token_ids) == alone_outputs()[3]


def run_with_preemptions(mode: str, seed: int) -> tuple[dict[int, list[int]], int, int]:
    """Shared-prefix requests arriving in waves, preempted at random points; returns outputs by prompt index,
    preemptions and prompt tokens found cached."""
    ex = cached_llm().executor
    ex.reset_prefix_cache(True)
    core, policy = scripted_core(ex)
    rng = np.random.default_rng(seed)
    prompts = shared_prompts()
    reqs = {}
    preemptions = 0
    pending = list(range(len(prompts)))
    while pending or core.has_work():
        if pending and rng.random() < 0.3:
            i = pending.pop(0)
            reqs[i] = add(core, f"{mode}-{seed}-{i}", prompts[i])
        running = [r for r in core.running if r.num_computed > 0]
        if running and rng.random() < 0.3:
            victim = running[rng.integers(len(running))]
            (policy.swap_out if mode == "swap" else policy.recompute_out).append(victim.request_id)
            preemptions += 1
        free = ex.free_device_pages() - 4  # room to decode
        for req in core.paused:
            need = -(-req.num_computed // ex.page_size)
            if need <= free and rng.random() < 0.5:
                policy.swap_in.append(req.request_id)
                free -= need
        core.step()
        check_page_ownership(core)
    return {i: r.output_ids for i, r in reqs.items()}, preemptions, core.prefix_cache.hits


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preempted_requests_with_shared_pages_give_the_cache_off_tokens(mode: str) -> None:
    expected = alone_outputs()
    total = hits = 0
    for seed in range(3):
        outputs, preemptions, hit = run_with_preemptions(mode, seed)
        total += preemptions
        hits += hit
        for i, out in outputs.items():
            assert tuple(out) == expected[i], f"{mode} seed {seed} prompt {i}"
    assert total >= 10, f"only {total} preemptions: {mode} went unexercised"
    assert hits > 0
    ex = cached_llm().executor
    assert ex.blocks.device.num_used == 0 and ex.blocks.host.num_used == 0


def device_pages_as_host_layout(core: EngineCore) -> np.ndarray:
    """The device KV cache as one host array in the host tier's page-major layout `[pages, layers, 2, Hkv, page,
    dim]`."""
    return np.moveaxis(np.stack([np.stack([np.asarray(k), np.asarray(v)]) for k, v in core.executor.runner.kv_cache]),
                       3, 0)  # fmt: skip


def check_copies_agree(core: EngineCore) -> None:
    """Each running request's host copy holds its device K/V for the synced tokens, and a page cached on both
    tiers under one hash, copied from one computation (same origin), holds the same K/V on both."""
    ex = core.executor
    ex.host.flush()
    blocks, s = ex.blocks, ex.page_size
    device = device_pages_as_host_layout(core)
    host = ex.host.host_pages(range(ex.host.num_pages))
    for req in core.requests.values():
        if req.status is RequestStatus.RUNNING and req.device_pages:
            for t in range(min(req.num_host_synced, req.num_computed)):
                np.testing.assert_array_equal(host[req.host_pages[t // s], :, :, :, t % s],
                                              device[req.device_pages[t // s], :, :, :, t % s],
                                              err_msg=f"{req.request_id} token {t}")  # fmt: skip
    for device_page in range(1, blocks.device.num_pages):
        h = blocks.device_index.hash_of(device_page)
        host_page = None if h is None else blocks.host_index.get(h)
        if host_page is None or blocks.host_index.origin(host_page) != blocks.device_index.origin(device_page):
            continue
        np.testing.assert_array_equal(host[host_page], device[device_page])


class PrefixCacheMachine(ScriptedEngineRules):
    """Random admit / step / preempt / resume / abort over requests sharing prefixes, on a device pool small
    enough that cached pages are evicted and hit again from the host tier."""

    id_prefix = "p"

    def __init__(self) -> None:
        super().__init__()
        self.ex = cached_llm().executor
        self.ex.reset_prefix_cache(True)
        self.core, self.policy = scripted_core(self.ex)
        self.expected = alone_outputs()
        self.prompts = shared_prompts()

    @invariant()
    def no_page_freed_while_held_and_none_leaks(self) -> None:
        check_page_ownership(self.core)

    @invariant()
    def host_and_device_copies_agree(self) -> None:
        check_copies_agree(self.core)

    @invariant()
    def outputs_follow_the_cache_off_run(self) -> None:
        for rid in self.core.live_ids():
            req = self.core.requests.get(rid) or self.core.draining[rid]
            read = [t for t in req.output_ids if t != PENDING_TOKEN]
            assert tuple(read) == self.expected[self.index[rid]][: len(read)], rid

    def teardown(self) -> None:
        reqs = {rid: self.core.requests.get(rid) or self.core.draining[rid] for rid in self.core.live_ids()}
        for _ in range(2000):  # every request ends within far fewer steps: more means nothing moves any more
            if not self.core.has_work():
                break
            # One resume a step, when it leaves room to decode: a small pool cannot take them all at once.
            paused = self.core.paused
            if paused and -(-paused[0].num_computed // self.ex.page_size) + 2 <= self.ex.free_device_pages():
                self.policy.swap_in.append(paused[0].request_id)
            elif not self.core.last_step_moved and self.core.running:
                # Sharing fits more requests in than their growth does, and the script never preempts by itself.
                self.policy.recompute_out.append(self.core.running[-1].request_id)
            self.core.step()
        assert not self.core.has_work(), (
            f"stuck: {[(r.request_id, r.status, r.num_computed) for r in self.core.requests.values()]}"
        )
        for rid, req in reqs.items():
            assert tuple(req.output_ids) == self.expected[self.index[rid]], rid
        assert self.ex.blocks.device.num_used == 0 and self.ex.blocks.host.num_used == 0


PrefixCacheMachine.TestCase.settings = settings(
    max_examples=8, stateful_step_count=15, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)  # fmt: skip
TestPrefixCacheMachine = PrefixCacheMachine.TestCase
