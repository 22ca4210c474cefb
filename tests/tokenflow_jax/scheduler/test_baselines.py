"""Baseline policies: sglang (prefill-first, retract fewest-output) and andes (QoE gain per page knapsack).

Decisions are checked on hand-built scheduler states over a plain executor value object; then each policy
serves a real tiny engine with a KV pool too small for the load, and greedy outputs must match fcfs and
requests run alone.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import numpy as np
import pytest

from tokenflow_jax.request import Request, RequestStatus
from tokenflow_jax.sampling import SamplingParams
from tokenflow_jax.scheduler.andes import AndesPolicy
from tokenflow_jax.scheduler.interface import SchedulerState
from tokenflow_jax.scheduler.registry import make_policy
from tokenflow_jax.scheduler.sglang import SGLangPolicy
from tokenflow_jax.tracker import RequestTracker

os.environ.setdefault("TOKENFLOW_JAX_CACHE_DIR", os.path.join(tempfile.gettempdir(), "tokenflow_jax_test_xla"))

PAGE = 4


@dataclasses.dataclass
class ExecutorLimits:
    """The capacity side of the Executor protocol that policies read (no data, no clock of its own)."""

    free_pages: int
    page_size: int = PAGE
    num_device_pages: int = 64
    num_host_pages: int = 0
    max_num_seqs: int = 4
    max_batch_tokens: int = 64
    max_model_len: int = 128

    def free_device_pages(self) -> int:
        return self.free_pages

    def free_host_pages(self) -> int:
        return 0

    def pages_freed_by(self, request: Request) -> int:
        return len(request.device_pages)  # hand-built requests share no page

    def shared_pages_overcount(self, requests: list[Request]) -> None:
        return None

    def pinned_pages_of(self, request: Request) -> int:
        return 0


class Pages:
    """Hands out distinct device page ids to hand-built requests."""

    def __init__(self) -> None:
        self.next = 1

    def take(self, n: int) -> list[int]:
        self.next += n
        return list(range(self.next - n, self.next))


def make_req(rid: str, prompt: int, outputs: int = 0, *, max_tokens: int = 40, running: bool = False,
             pages: Pages | None = None, arrival: float = 0.0, rate: float = 20.0,
             order: int = 0) -> Request:  # fmt: skip
    """A request with `outputs` tokens generated; running ones hold KV for all tokens but the newest."""
    req = Request(rid, [1] * prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), rate, arrival)
    req.output_ids = [2] * outputs
    if running:
        req.status = RequestStatus.RUNNING
        req.num_computed = req.num_tokens - 1
        req.device_pages = pages.take(-(-req.num_computed // PAGE))
        req.admitted_order = order
    return req


def state_of(reqs: list[Request], free: int, *, now: float = 0.0, tracker: RequestTracker | None = None,
             **limits: int) -> SchedulerState:  # fmt: skip
    if tracker is None:
        tracker = RequestTracker()
        for r in reqs:
            tracker.add(r.request_id, r.rate, r.arrival, prompt_len=len(r.prompt_ids), max_tokens=r.sampling.max_tokens)
    waiting = sorted((r for r in reqs if r.status is RequestStatus.WAITING), key=lambda r: r.arrival)
    running = sorted((r for r in reqs if r.status is RequestStatus.RUNNING), key=lambda r: r.admitted_order)
    return SchedulerState(now, waiting, running, [], tracker, ExecutorLimits(free, **limits))


# ---- sglang
def test_sglang_is_registered() -> None:
    assert isinstance(make_policy("sglang"), SGLangPolicy)
    assert isinstance(make_policy("andes", interval=2), AndesPolicy)


def test_sglang_runs_a_prefill_only_step_when_a_waiting_request_fits() -> None:
    pages = Pages()
    a = make_req("a", 6, 3, running=True, pages=pages, order=1)
    w = make_req("w", 10, arrival=1.0)
    plan = SGLangPolicy().plan(state_of([a, w], free=20))
    assert plan.schedule == {"w": 10}  # the decode of `a` waits for the prefill batch


def test_sglang_decodes_everyone_when_nothing_can_be_admitted() -> None:
    pages = Pages()
    a = make_req("a", 6, 3, running=True, pages=pages, order=1)
    b = make_req("b", 5, 1, running=True, pages=pages, order=2)
    w = make_req("w", 30, arrival=1.0)  # needs 8 pages, 2 free
    plan = SGLangPolicy().plan(state_of([a, b, w], free=2))
    assert plan.schedule == {"a": 1, "b": 1} and not plan.recompute_out


def test_sglang_admission_reserves_room_for_running_requests_growth() -> None:
    pages = Pages()
    a = make_req("a", 8, 1, max_tokens=200, running=True, pages=pages, order=1)
    w = make_req("w", 8, arrival=1.0)
    # 8 free pages = 32 tokens, but `a` is expected to need 0.7 * 199 more: `w` must not enter.
    assert SGLangPolicy().plan(state_of([a, w], free=8)).schedule == {"a": 1}
    assert SGLangPolicy().plan(state_of([a, w], free=60)).schedule == {"w": 8}


def test_sglang_continues_a_chunked_prefill_first() -> None:
    pages = Pages()
    c = make_req("c", 50, running=True, pages=pages, order=1)
    c.num_computed, c.device_pages = 16, pages.take(4)  # 34 prompt tokens still to compute
    w = make_req("w", 10, arrival=1.0)
    plan = SGLangPolicy().plan(state_of([c, w], free=40, max_batch_tokens=40))
    assert plan.schedule == {"c": 34, "w": 6}


def test_sglang_chunked_mixes_a_bounded_prefill_chunk_into_the_decode_batch() -> None:
    pages = Pages()
    a = make_req("a", 6, 3, running=True, pages=pages, order=1)
    c = make_req("c", 50, running=True, pages=pages, order=2)
    c.num_computed, c.device_pages = 16, pages.take(4)  # 34 prompt tokens still to compute
    w = make_req("w", 10, arrival=1.0)
    policy = make_policy("sglang-chunked", chunked_prefill_size=20)
    assert isinstance(policy, SGLangPolicy) and policy.name == "sglang-chunked"
    # `a` decodes, the chunked prefill continues with at most 20 tokens, `w` waits for the next chunk.
    assert policy.plan(state_of([a, c, w], free=40)).schedule == {"a": 1, "c": 20}
    c.num_computed = 40  # 10 left: `w` takes the rest of the chunk
    assert policy.plan(state_of([a, c, w], free=40)).schedule == {"a": 1, "c": 10, "w": 10}
    with pytest.raises(ValueError, match="chunked_prefill_size"):
        SGLangPolicy(chunked_prefill_size=0)


def test_sglang_retracts_the_request_with_fewest_output_tokens() -> None:
    pages = Pages()
    # Each decoder's KV ends on a page boundary (num_computed = 8), so each needs one new page; one is free.
    a = make_req("a", 4, 5, running=True, pages=pages, order=1)
    b = make_req("b", 7, 2, running=True, pages=pages, order=2)
    c = make_req("c", 6, 3, running=True, pages=pages, order=3)
    policy = SGLangPolicy()
    ratio = policy.new_token_ratio
    plan = policy.plan(state_of([a, b, c], free=1))
    assert plan.recompute_out == ["b"]
    assert plan.schedule == {"a": 1, "c": 1}
    assert policy.new_token_ratio >= ratio  # admission backs off after a retraction


def test_sglang_retraction_ties_go_to_the_longest_prompt() -> None:
    pages = Pages()
    a = make_req("a", 5, 4, running=True, pages=pages, order=1)  # both need a new page, none is free
    b = make_req("b", 13, 4, running=True, pages=pages, order=2)
    plan = SGLangPolicy().plan(state_of([a, b], free=0))
    assert plan.recompute_out == ["b"] and plan.schedule == {"a": 1}


# ---- andes
def tracker_with_tokens(reqs: list[Request], token_times: dict[str, list[float]]) -> RequestTracker:
    tracker = RequestTracker()
    for r in reqs:
        tracker.add(r.request_id, r.rate, r.arrival, prompt_len=len(r.prompt_ids), max_tokens=r.sampling.max_tokens)
        for t in token_times.get(r.request_id, []):
            tracker.on_token(r.request_id, t)
    return tracker


def test_andes_prefers_more_gain_per_page() -> None:
    # Same wait (same gain per output token), different context: the smaller one fits the room first.
    small = make_req("small", 8, arrival=0.0, max_tokens=40)
    big = make_req("big", 24, arrival=0.0, max_tokens=40)
    state = state_of([big, small], free=3, now=2.0)
    policy = AndesPolicy()
    assert policy.gain(state, small) == pytest.approx(policy.gain(state, big))
    assert policy.gain(state, small) > 0
    assert policy.plan(state).schedule == {"small": 8}


def test_andes_waiting_gain_grows_with_wait() -> None:
    req = make_req("w", 8, arrival=0.0)
    policy = AndesPolicy()
    gains = [policy.gain(state_of([req], free=10, now=t), req) for t in (0.0, 0.5, 1.5, 3.0)]
    assert gains[0] == 0.0 and gains == sorted(gains) and gains[-1] > gains[-2]


def test_andes_preempts_the_full_buffer_for_an_overdue_request() -> None:
    pages = Pages()
    full = make_req("full", 4, 20, running=True, pages=pages, order=1, arrival=0.0)
    dry = make_req("dry", 4, 20, running=True, pages=pages, order=2, arrival=0.0)
    late = make_req("late", 4, arrival=0.0)
    # At t=3 `full` generated 20 tokens just now (1 s of reading left); `dry` was read out long ago.
    times = {"full": list(np.linspace(2.9, 3.0, 20)), "dry": list(np.linspace(0.1, 0.2, 20))}
    tracker = tracker_with_tokens([full, dry, late], times)
    state = state_of([full, dry, late], free=0, now=3.0, tracker=tracker, max_num_seqs=2)
    policy = AndesPolicy()
    assert policy.gain(state, full) < policy.gain(state, dry)
    plan = policy.plan(state)
    assert plan.recompute_out == ["full"]
    assert plan.schedule == {"dry": 1, "late": 4}


def test_andes_does_not_preempt_a_request_past_the_cap_or_between_decisions() -> None:
    pages = Pages()
    full = make_req("full", 4, 20, running=True, pages=pages, order=1)
    late = make_req("late", 4)
    tracker = tracker_with_tokens([full, late], {"full": list(np.linspace(2.9, 3.0, 20))})
    state = state_of([full, late], free=0, now=3.0, tracker=tracker, max_num_seqs=1)
    assert AndesPolicy().plan(state).recompute_out == ["full"]
    full.preemptions_recompute = 1
    assert AndesPolicy(max_preemptions=1).plan(state).recompute_out == []
    full.preemptions_recompute = 0
    policy = AndesPolicy(interval=3)
    policy.plan(state_of([full], free=4, now=0.0))  # iteration 0 decides
    assert policy.plan(state).recompute_out == []  # iteration 1 does not


# ---- end to end on the real engine
PROMPT_SEED, NUM_PROMPTS, MAX_TOKENS = 3, 6, 24


@pytest.fixture(scope="module")
def llm():
    from tokenflow_jax import LLM

    # 9 pages of 16 tokens (8 usable) for six requests of ~40-56 tokens: about half fit at once.
    return LLM("tiny-random", scheduler="fcfs", max_num_seqs=4, max_batch_tokens=32, max_model_len=128, kv_pages=8,
               warmup=False)  # fmt: skip


def prompts() -> list[list[int]]:
    rng = np.random.default_rng(PROMPT_SEED)
    return [[int(t) for t in rng.integers(0, 256, int(rng.integers(16, 33)))] for _ in range(NUM_PROMPTS)]


def serve(llm, policy: str, config: dict, preemption: str = "auto") -> tuple[list[list[int]], int]:
    """Greedy outputs of the prompt pool under `policy` on the shared engine, and the preemptions it made."""
    from tokenflow_jax.engine.core import EngineCore

    core = EngineCore(llm.executor, make_policy(policy, **config), eos_token_ids=llm.tokenizer.eos_token_ids,
                      preemption=preemption)  # fmt: skip
    sp = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    reqs = [llm.make_request(p, sp, rate=200.0) for p in prompts()]
    for r in reqs:
        core.add_request(r)
    steps = 0
    while core.has_work():
        core.step()
        steps += 1
        assert steps < 2000, f"{policy} does not finish"
    assert llm.executor.free_device_pages() == llm.executor.num_device_pages  # nothing leaked
    assert llm.executor.free_host_pages() == llm.executor.num_host_pages
    preemptions = sum(rec.preemptions_recompute + rec.preemptions_swap for rec in core.records.values())
    return [list(r.output_ids) for r in reqs], preemptions


@pytest.fixture(scope="module")
def alone(llm) -> list[list[int]]:
    sp = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    return [llm.generate([p], sp)[0].token_ids for p in prompts()]


# Preemption must happen where marked: sglang without its memory reservation retracts, andes preempts for gain.
@pytest.mark.parametrize(
    "policy, config, preempts",
    [
        ("fcfs", {}, True),
        ("sglang", {}, False),
        ("sglang", {"init_new_token_ratio": 0.0, "min_new_token_ratio": 0.0}, True),
        ("sglang-chunked", {"chunked_prefill_size": 8, "init_new_token_ratio": 0.0, "min_new_token_ratio": 0.0}, True),
        ("andes", {}, True),
    ],
)
def test_policy_outputs_match_requests_served_alone(llm, alone, policy: str, config: dict, preempts: bool) -> None:
    outputs, preemptions = serve(llm, policy, config)
    assert all(len(o) == MAX_TOKENS for o in outputs)
    assert outputs == alone
    if preempts:
        assert preemptions > 0


@pytest.mark.parametrize("policy", ["fcfs", "sglang", "andes"])
def test_baselines_resume_requests_swapped_out_under_swap_preemption(llm, alone, policy: str) -> None:
    config = {"init_new_token_ratio": 0.0, "min_new_token_ratio": 0.0} if policy == "sglang" else {}
    outputs, preemptions = serve(llm, policy, config, preemption="swap")
    assert preemptions > 0
    assert outputs == alone
