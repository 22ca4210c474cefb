"""The real engine on CPU: preemption by swap and by recompute is invisible in the outputs, pages never leak,
host copies match the device, and nothing compiles after warm-up."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import invariant

from tests.tokenflow_jax.engine.harness import (
    ENGINE_KW,
    MAX_TOKENS,
    SAMPLED,
    ScriptedEngineRules,
    add,
    check_executor_clean,
    check_host_copies,
    check_page_ownership,
    prompt_pool,
    reference_outputs,
    sampled_reference_outputs,
    scripted_core,
    small_llm,
    small_llm_without_prefix_cache,
)
from tokenflow_jax.engine.buckets import CompileDuringServing
from tokenflow_jax.engine.llm import LLM
from tokenflow_jax.engine.runner import backend_compile_count
from tokenflow_jax.request import PENDING_TOKEN, Request, RequestStatus
from tokenflow_jax.sampling import SamplingParams


@pytest.fixture(autouse=True)
def clean_shared_executor() -> None:
    """Every test here shares `small_llm()`'s executor: it must find it clean and leave it clean."""
    ex = small_llm().executor
    check_executor_clean(ex, "before")
    yield
    check_executor_clean(ex, "after")


def run_with_random_preemptions(
    mode: str, seed: int, sampled: bool = False, llm: LLM | None = None
) -> tuple[dict[str, list[int]], int]:
    """Run the pool with a preemption at random points; paused requests resume a few steps later. Sampled:
    every request draws with temperature, top-k and top-p, seeded by its index + 1. `llm`: default small_llm()."""
    ex = (llm or small_llm()).executor
    core, policy = scripted_core(ex)
    rng = np.random.default_rng(seed)
    reqs = {
        f"{mode}-{i}": add(core, f"{mode}-{i}", p, sampling=SAMPLED if sampled else None, seed=i + 1)
        for i, p in enumerate(prompt_pool())
    }
    paused_for: dict[str, int] = {}
    preemptions = 0
    while core.has_work():
        running = [r for r in core.running if r.num_computed > 0]
        if running and rng.random() < 0.35:
            victim = running[rng.integers(len(running))]
            (policy.swap_out if mode == "swap" else policy.recompute_out).append(victim.request_id)
            paused_for[victim.request_id] = int(rng.integers(1, 4))
            preemptions += 1
        for req in core.paused:
            paused_for[req.request_id] -= 1
            need = -(-req.num_computed // ex.page_size)
            if paused_for[req.request_id] <= 0 and need <= ex.free_device_pages() - 4:
                policy.swap_in.append(req.request_id)
        core.step()
        check_page_ownership(core)
    return {rid: r.output_ids for rid, r in reqs.items()}, preemptions


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded-sampling"])
@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preempted_outputs_identical_to_uninterrupted(mode: str, sampled: bool) -> None:
    expected = sampled_reference_outputs() if sampled else reference_outputs()
    if sampled:  # sampling really draws: the seeded outputs are not the greedy ones
        assert expected != reference_outputs()
    total = 0
    for seed in range(3):
        outputs, preemptions = run_with_random_preemptions(mode, seed, sampled)
        total += preemptions
        for i, out in enumerate(outputs.values()):
            assert tuple(out) == expected[i], f"{mode} seed {seed} request {i}"
    ex = small_llm().executor
    assert ex.host.memory_kind == "pinned_host"  # swaps went through the pinned pool
    assert total >= 15, f"only {total} preemptions: the test did not exercise {mode}"
    assert ex.blocks.device.num_used == 0 and ex.blocks.host.num_used == 0


def test_preempted_outputs_identical_without_the_prefix_cache() -> None:
    """With the prefix cache off, write-through syncs only full pages and a swap-out copies the partial tail
    itself: a resumed request still continues on exactly its own KV."""
    llm = small_llm_without_prefix_cache()
    total = 0
    for seed in range(3):
        outputs, preemptions = run_with_random_preemptions("swap", seed, llm=llm)
        total += preemptions
        for i, out in enumerate(outputs.values()):
            assert tuple(out) == reference_outputs()[i], f"seed {seed} request {i}"
    assert total >= 15, f"only {total} preemptions"
    assert llm.executor.host.memory_kind == "numpy"  # the CPU's default pool
    assert llm.executor.blocks.device.num_used == 0 and llm.executor.blocks.host.num_used == 0


def test_swap_moves_real_bytes_and_frees_device_pages_at_once() -> None:
    ex = small_llm().executor
    core, policy = scripted_core(ex)
    req = add(core, "swap-bytes", prompt_pool()[0])
    while req.num_computed < 9:  # more than two pages of a 4-token page
        core.step()
    before, held = ex.blocks.device.num_used, len(req.device_pages)
    assert held >= 3
    policy.swap_out.append(req.request_id)
    out0 = ex.bytes_to_host
    core.step()
    assert req.status is RequestStatus.PAUSED and len(req.device_pages) == 0
    assert ex.blocks.device.num_used == before - held
    assert ex.bytes_to_host > out0
    ex.host.flush()
    # Its full pages that no later allocation evicted are still cached on the device: only the rest are loaded.
    cached = len(ex.blocks.device_index.lookup(ex.blocks.page_hashes(req, req.num_computed)))
    assert cached < held  # the partial last page at least
    policy.swap_in.append(req.request_id)
    in0 = ex.bytes_to_device
    core.step()
    assert ex.bytes_to_device - in0 == (held - cached) * ex.host.page_bytes
    while core.has_work():
        core.step()
    assert tuple(req.output_ids) == reference_outputs()[0]


def test_a_swap_that_finds_the_host_tier_full_falls_back_to_recompute() -> None:
    """A 3-page host tier holds the write-through copies of the first request; the second one's swap finds no
    room, so it is preempted by recompute instead (its device pages freed, nothing half-copied), and its
    output is unchanged."""
    llm = LLM("tiny-random", **dict(ENGINE_KW, host_kv_pages=3))
    ex = llm.executor
    core, policy = scripted_core(ex)
    first, second = add(core, "first", prompt_pool()[0]), add(core, "second", prompt_pool()[1])
    while second.num_computed < 9:  # 3 pages each: more than the host has room for beside the first's copies
        core.step()
    assert ex.free_host_pages() < -(-second.num_computed // ex.page_size)
    policy.swap_out.append(second.request_id)
    core.step()
    assert second.status is RequestStatus.WAITING  # a recomputed request queues again from its tokens
    assert (second.preemptions_swap, second.preemptions_recompute) == (0, 1)
    assert not second.device_pages and not second.host_pages and second.num_computed == 0
    check_page_ownership(core)
    while core.has_work():
        core.step()
    assert tuple(first.output_ids) == reference_outputs()[0] and tuple(second.output_ids) == reference_outputs()[1]
    check_executor_clean(ex, "after")
    llm.close()


class EngineMachine(ScriptedEngineRules):
    """Random admit / preempt / resume / abort / finish sequences against the real engine."""

    def __init__(self) -> None:
        super().__init__()
        self.ex = small_llm().executor
        self.core, self.policy = scripted_core(self.ex)
        self.expected = reference_outputs()
        self.prompts = prompt_pool()

    @invariant()
    def pages_owned_once(self) -> None:
        check_page_ownership(self.core)

    @invariant()
    def host_copies_match_device(self) -> None:
        check_host_copies(self.core)

    @invariant()
    def outputs_follow_reference(self) -> None:
        for rid in self.core.live_ids():
            req = self.core.requests.get(rid) or self.core.draining[rid]
            read = [t for t in req.output_ids if t != PENDING_TOKEN]  # at most the last one is in flight
            assert PENDING_TOKEN not in req.output_ids[: len(read)], rid
            assert tuple(read) == self.expected[self.index[rid]][: len(read)], rid

    def teardown(self) -> None:
        reqs = {rid: self.core.requests.get(rid) or self.core.draining[rid] for rid in self.core.live_ids()}
        while self.core.has_work():
            for r in self.core.paused:
                self.policy.swap_in.append(r.request_id)
            self.core.step()
        for rid, req in reqs.items():
            assert tuple(req.output_ids) == self.expected[self.index[rid]], rid
            assert req.finish_reason == "length"
        assert self.ex.blocks.device.num_used == 0 and self.ex.blocks.host.num_used == 0


EngineMachine.TestCase.settings = settings(
    max_examples=12, stateful_step_count=20, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)  # fmt: skip
TestEngineMachine = EngineMachine.TestCase


def test_zero_compilations_in_steady_state() -> None:
    ex = small_llm().executor
    ex.warmup(progress=False)
    before = backend_compile_count()
    for mode in ("swap", "recompute"):
        run_with_random_preemptions(mode, seed=11)
    sampled = SamplingParams(max_tokens=8, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    small_llm().generate(["mixed workload", "of prompts", "a" * 40], sampled)
    assert backend_compile_count() == before, "something compiled after warm-up"
    with pytest.raises(CompileDuringServing):
        ex.runner.buckets.token_bucket(ENGINE_KW["max_batch_tokens"] + 1)


def test_engine_rejects_requests_beyond_the_model_length() -> None:
    core, _ = scripted_core(small_llm().executor)
    with pytest.raises(ValueError, match="exceeds the model length"):
        add(core, "too-long", list(range(60)), max_tokens=MAX_TOKENS)
    with pytest.raises(ValueError, match="at least one token"):
        add(core, "empty", [])


def test_decode_step_model_recovers_a_linear_cost_and_refuses_to_extrapolate_from_alike_steps() -> None:
    from tokenflow_jax.engine.step_model import DecodeStepModel

    rng = np.random.default_rng(0)
    model = DecodeStepModel(window=256, refit_every=16)
    for _ in range(64):
        seqs, context = int(rng.integers(1, 64)), int(rng.integers(100, 50_000))
        model.add(seqs, context, 0.004 + 2e-5 * seqs + 3e-7 * context + rng.normal(0, 1e-6))
    base, per_seq, per_context = model.coefficients
    np.testing.assert_allclose([base, per_seq, per_context], [0.004, 2e-5, 3e-7], rtol=0.05)
    assert DecodeStepModel.fit([(8, 1000, 0.01)] * 40) is None


@pytest.mark.parametrize("seed", range(6))
def test_decode_step_model_fits_the_closest_non_negative_coefficients(seed: int) -> None:
    """Where the unconstrained fit has a negative slope (step times that fall with the batch, as bucketed shapes
    and a noisy host give), the fit is the non-negative least-squares one (scipy's NNLS as the reference), not
    the unconstrained fit with that slope clipped to 0 and its intercept left where the slope had put it."""
    from scipy.optimize import nnls

    from tokenflow_jax.engine.step_model import DecodeStepModel

    rng = np.random.default_rng(seed)
    seqs = rng.integers(1, 33, 200)
    context = seqs * rng.integers(60, 120, 200)
    # Time falls with sequences and rises with context (or the reverse): collinear terms, one slope negative.
    sign = 1 if seed % 2 else -1
    seconds = 0.002 + sign * 4e-5 * seqs - sign * 3e-7 * context + rng.normal(0, 2e-4, 200)
    seconds = np.maximum(seconds, 1e-4)
    samples = list(zip(seqs.tolist(), context.tolist(), seconds.tolist(), strict=True))
    x = np.column_stack([np.ones(200), seqs, context]).astype(float)
    unconstrained = np.linalg.lstsq(x, seconds, rcond=None)[0]
    assert (unconstrained < 0).any()  # the case this test is about
    # Columns scaled so that NNLS's tolerance sees them alike; the scale is undone on its coefficients.
    scale = np.abs(x).max(axis=0)
    reference = nnls(x / scale, seconds)[0] / scale
    fitted = np.array(DecodeStepModel.fit(samples))
    assert (fitted >= 0).all()
    residual = np.square(x @ fitted - seconds).sum()
    assert residual == pytest.approx(np.square(x @ reference - seconds).sum(), rel=1e-6)
    np.testing.assert_allclose(fitted, reference, rtol=1e-4, atol=1e-12)
    clipped = np.maximum(unconstrained, 0.0)
    assert residual < np.square(x @ clipped - seconds).sum()


def test_the_first_fit_predicts_the_steps_of_the_moment_not_their_average_since_start() -> None:
    """A burst's first decode steps are slower (~3x here); the first fit averages them in. Its speed is then what
    it would be had the fit been known from the first step (a model given those coefficients beforehand, fed the
    same steps), not 1.0: taken at 1.0, the fit predicted ~2x the steps of the moment and the policy saw an
    overload the machine did not have (docs/DESIGN.md 3.15)."""
    from tokenflow_jax.engine.step_model import DecodeStepModel

    def cost(seqs: int, context: int) -> float:
        return 0.001 + 1e-4 * seqs + 2e-6 * context

    rng = np.random.default_rng(1)
    shapes = [(int(rng.integers(2, 16)), int(rng.integers(100, 2_000))) for _ in range(64)]
    steps = [(b, c, (3.0 if i < 32 else 1.0) * cost(b, c)) for i, (b, c) in enumerate(shapes)]
    learned = DecodeStepModel(window=512, refit_every=32)
    for step in steps:
        learned.add(*step)
    assert learned.fitted is not None  # fitted once, at the 64th step
    known = DecodeStepModel(refit_every=None, fitted=learned.fitted)
    for step in steps:
        known.add(*step)
    assert learned.speed.value == pytest.approx(known.speed.value, rel=1e-12)
    # The fit alone averages the slow start in; at its speed the prediction is nearer the steps of the moment.
    now = cost(8, 1_000)
    assert learned.predict(8, 1_000) > 1.6 * now
    assert learned.predict_now(8, 1_000) < 1.5 * now


def test_token_slice_is_the_slice_of_prompt_then_output() -> None:
    req = Request("r", [11, 12, 13], SamplingParams(max_tokens=8), rate=10.0, arrival=0.0, output_ids=[21, 22, 23, 24])
    tokens = req.prompt_ids + req.output_ids
    for start in range(len(tokens) + 1):
        for stop in range(start, len(tokens) + 2):
            assert req.token_slice(start, stop) == tokens[start:stop], (start, stop)


def test_a_step_left_in_flight_never_reaches_a_later_core() -> None:
    """Aborting the last request leaves its step in flight; a new core over the same executor (as the bench and
    these tests do) must not read that step's token as its own same-named request's first token."""
    ex = small_llm().executor
    pool, expected = prompt_pool(), reference_outputs()
    first, _ = scripted_core(ex)
    add(first, "r", pool[0])
    first.step()  # the prefill is dispatched; its token is read only by the next step
    first.abort("r")
    second, _ = scripted_core(ex)
    req = add(second, "r", pool[1])
    while second.has_work():
        second.step()
    assert tuple(req.output_ids) == expected[1]


def test_an_idle_gap_after_the_last_request_is_not_timed_as_a_step() -> None:
    """A step still in flight when the last request ends is waited for then, not after the idle gap that
    follows: otherwise the gap is folded into the decode-step estimate the policies plan with."""
    ex = small_llm().executor
    core, _ = scripted_core(ex)
    add(core, "a", prompt_pool()[0])
    for _ in range(4):  # prefill, then decode steps
        core.step()
    core.abort("a")  # its decode step is in flight
    before = ex.estimates().decode_step_s
    gap_s = 2.0
    time.sleep(gap_s)
    add(core, "b", prompt_pool()[1])
    core.step()
    # Folded in, the gap would move the average by at least its up-weight x gap; a real step moves it by far less
    # (it would have to take over gap_s / 2 to reach this bound).
    assert ex.estimates().decode_step_s < before + 0.2 * gap_s / 2
    while core.has_work():
        core.step()
