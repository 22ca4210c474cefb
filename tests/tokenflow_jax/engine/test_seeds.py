"""Seeds through `LLM.generate`: unseeded requests draw differently from each other, and a seeded request draws
the same tokens whether or not it was preempted, under every policy and by swap and by recompute."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest

from tokenflow_jax import LLM
from tokenflow_jax.sampling_params import SamplingParams

ENGINE = dict(page_size=4, max_num_seqs=4, max_batch_tokens=32, max_model_len=64, warmup=False)
SAMPLED = SamplingParams(max_tokens=16, ignore_eos=True, temperature=1.0, top_k=50, top_p=0.95)
N_REQUESTS = 8
# SGLang's admission reserves room for expected growth; an optimistic estimate makes it admit, then retract.
POLICY_CONFIG = {"sglang": {"init_new_token_ratio": 0.1, "min_new_token_ratio": 0.1}}


def burst() -> tuple[list[list[int]], list[SamplingParams]]:
    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(0, 256, int(rng.integers(4, 14)))] for _ in range(N_REQUESTS)]
    return prompts, [dataclasses.replace(SAMPLED, seed=1000 + i) for i in range(N_REQUESTS)]


@functools.lru_cache(maxsize=1)
def alone_outputs() -> tuple[tuple[int, ...], ...]:
    """Each request of the burst alone on an engine with room for everything: never preempted."""
    llm = LLM("tiny-random", scheduler="fcfs", kv_pages=64, host_kv_pages=0, **ENGINE)
    out = tuple(tuple(llm.generate([p], s)[0].token_ids) for p, s in zip(*burst(), strict=True))
    llm.close()
    return out


def test_unseeded_requests_draw_differently() -> None:
    llm = LLM("tiny-random", scheduler="fcfs", kv_pages=64, host_kv_pages=0, **ENGINE)
    prompt, unseeded = [1, 2, 3, 4], dataclasses.replace(SAMPLED, seed=None)
    first = [tuple(o.token_ids) for o in llm.generate([prompt] * N_REQUESTS, unseeded)]
    again = [tuple(o.token_ids) for o in llm.generate([prompt] * N_REQUESTS, unseeded)]
    assert len(set(first + again)) == 2 * N_REQUESTS, "unseeded requests drew the same tokens"
    # The same prompt with one seed is one output: the difference above is the seed's, not noise.
    seeded = [tuple(o.token_ids) for o in llm.generate([prompt] * 3, dataclasses.replace(SAMPLED, seed=9))]
    assert len(set(seeded)) == 1
    llm.close()


@pytest.mark.parametrize("mode", ["swap", "recompute"])
@pytest.mark.parametrize("policy", ["fcfs", "sglang", "andes", "tokenflow"])
def test_seeded_sampled_outputs_are_identical_with_and_without_preemption(policy: str, mode: str) -> None:
    prompts, samplings = burst()
    # 12 usable pages of 4 tokens for 4 running requests that each grow to 5-8 pages: preemption is forced.
    # Readers at 2 tok/s: the streaming policies also pause requests whose readers are far behind.
    llm = LLM("tiny-random", scheduler=policy, preemption=mode, kv_pages=13, host_kv_pages=64, **ENGINE,
              scheduler_config=POLICY_CONFIG.get(policy))  # fmt: skip
    outs = llm.generate(prompts, samplings, rates=[2.0] * N_REQUESTS)
    records = list(llm.core.records.values())
    preempted = sum(getattr(r, f"preemptions_{mode}") for r in records)
    other = sum(getattr(r, f"preemptions_{'recompute' if mode == 'swap' else 'swap'}") for r in records)
    assert preempted > 0 and other == 0, f"{policy}: {preempted} by {mode}, {other} the other way"
    assert [tuple(o.token_ids) for o in outs] == list(alone_outputs())
    assert llm.executor.page_usage()[0] == 0 and llm.executor.page_usage()[2] == 0  # nothing leaked
    llm.close()
